//! Carrier files: `carriers.safetensors` (named f32 tensors, loadable from NumPy/PyTorch),
//! optional `.npy` exports, and reading them back.
use crate::carriers::Carriers;
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

fn tensor3(v: &[Vec<Vec<f64>>]) -> Result<Tensor> {
    let (a, b, c) = (v.len(), v[0].len(), v[0][0].len());
    let flat: Vec<f32> = v.iter().flatten().flatten().map(|&x| x as f32).collect();
    Ok(Tensor::from_vec(flat, (a, b, c), &Device::Cpu)?)
}

fn unpack3(t: &Tensor) -> Result<Vec<Vec<Vec<f64>>>> {
    let v: Vec<Vec<Vec<f32>>> = t.to_vec3()?;
    Ok(v.into_iter()
        .map(|a| {
            a.into_iter()
                .map(|b| b.into_iter().map(f64::from).collect())
                .collect()
        })
        .collect())
}

/// Named tensors of a carrier set.
pub fn to_tensors(c: &Carriers) -> Result<HashMap<String, Tensor>> {
    let mut m = HashMap::new();
    m.insert("refusal".to_string(), tensor3(&c.refusal)?);
    m.insert("refusal_orth".to_string(), tensor3(&c.refusal_orth)?);
    m.insert("mean_harmful".to_string(), tensor3(&c.mean_harmful)?);
    m.insert("mean_harmless".to_string(), tensor3(&c.mean_harmless)?);
    m.insert(
        "harmfulness".to_string(),
        tensor3(&c.refusal)?
            .narrow(1, 0, 1)?
            .squeeze(1)?
            .contiguous()?,
    );
    Ok(m)
}

/// Write the refusal carriers of bootstrap resamples (`resamples x layers x positions x width`)
/// as `bootstrap.safetensors`, the tensor `refusal`, for intervals that compare two anchors
/// resample by resample.
pub fn save_bootstrap(refusal: &[Vec<Vec<Vec<f64>>>], path: &Path) -> Result<()> {
    if refusal.is_empty() {
        return Ok(());
    }
    let (b, l, p, d) = (
        refusal.len(),
        refusal[0].len(),
        refusal[0][0].len(),
        refusal[0][0][0].len(),
    );
    let flat: Vec<f32> = refusal
        .iter()
        .flatten()
        .flatten()
        .flatten()
        .map(|&x| x as f32)
        .collect();
    let mut m = HashMap::new();
    m.insert(
        "refusal".to_string(),
        Tensor::from_vec(flat, (b, l, p, d), &Device::Cpu)?,
    );
    let meta = std::collections::BTreeMap::from([
        (
            "format".to_string(),
            "safegeo carrier bootstrap".to_string(),
        ),
        ("layers".to_string(), LAYER_CONVENTION.to_string()),
    ]);
    Ok(safegeo_runtime::files::save_f32_tensors_with_metadata(
        &m, &meta, path,
    )?)
}

/// Read [`save_bootstrap`]'s file back (`None` when it is absent or unreadable).
pub fn load_bootstrap(path: &Path) -> Option<Vec<Vec<Vec<Vec<f64>>>>> {
    let m = candle_core::safetensors::load(path, &Device::Cpu).ok()?;
    let t = m.get("refusal")?;
    let (b, ..) = t.dims4().ok()?;
    (0..b).map(|i| unpack3(&t.get(i).ok()?).ok()).collect()
}

/// The layer convention every carrier file states in its header.
pub const LAYER_CONVENTION: &str =
    "index l is the residual stream entering block l (Hugging Face's hidden_states[l])";

/// Write `carriers.safetensors` atomically, with `metadata` (model, positions) and the layer
/// convention in its header.
pub fn save(c: &Carriers, metadata: &[(&str, String)], path: &Path) -> Result<()> {
    let mut meta: std::collections::BTreeMap<String, String> = metadata
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    meta.insert("format".into(), "safegeo carriers".into());
    meta.insert("layers".into(), LAYER_CONVENTION.into());
    Ok(safegeo_runtime::files::save_f32_tensors_with_metadata(
        &to_tensors(c)?,
        &meta,
        path,
    )?)
}

/// Read a carrier set written by [`save`].
pub fn load(path: &Path) -> Result<Carriers> {
    let m = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
        Error::Invalid(format!(
            "{}: not a carrier file ({e})\n  fix: run `safegeo carriers --out DIR` first",
            path.display()
        ))
    })?;
    let get = |k: &str| {
        m.get(k)
            .ok_or_else(|| Error::Invalid(format!("{}: no tensor `{k}`", path.display())))
    };
    Ok(Carriers {
        refusal: unpack3(get("refusal")?)?,
        refusal_orth: unpack3(get("refusal_orth")?)?,
        mean_harmful: unpack3(get("mean_harmful")?)?,
        mean_harmless: unpack3(get("mean_harmless")?)?,
    })
}

/// Write a tensor as a NumPy `.npy` file (little-endian f32, C order).
pub fn write_npy(t: &Tensor, path: &Path) -> Result<()> {
    let shape: Vec<String> = t.dims().iter().map(|d| d.to_string()).collect();
    let shape = if shape.len() == 1 {
        format!("({},)", shape[0])
    } else {
        format!("({})", shape.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    // Magic (6) + version (2) + header length (2) + header + newline, padded to 64 bytes.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for x in t
        .flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()?
    {
        out.extend_from_slice(&x.to_le_bytes());
    }
    Ok(safegeo_runtime::files::write_atomic(path, &out)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_npy_header() {
        let c = Carriers {
            refusal: vec![vec![vec![1.0, 2.0], vec![3.0, 4.0]]],
            refusal_orth: vec![vec![vec![0.0, 1.0], vec![1.0, 0.0]]],
            mean_harmful: vec![vec![vec![5.0, 6.0], vec![7.0, 8.0]]],
            mean_harmless: vec![vec![vec![4.0, 4.0], vec![4.0, 4.0]]],
        };
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.safetensors");
        save(&c, &[("model_sha256", "abc".into())], &p).unwrap();
        let back = load(&p).unwrap();
        // The header names the file, its model and the layer convention.
        let bytes = std::fs::read(&p).unwrap();
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let meta = header.metadata().clone().unwrap();
        assert_eq!(meta["model_sha256"], "abc");
        assert_eq!(meta["layers"], LAYER_CONVENTION);
        assert_eq!(meta["format"], "safegeo carriers");
        assert_eq!(back.refusal, c.refusal);
        assert_eq!(back.mean_harmless, c.mean_harmless);
        let t = to_tensors(&c).unwrap();
        assert_eq!(
            t["harmfulness"].to_vec2::<f32>().unwrap(),
            vec![vec![1.0, 2.0]]
        );
        let n = dir.path().join("r.npy");
        write_npy(&t["refusal"], &n).unwrap();
        let bytes = std::fs::read(&n).unwrap();
        assert_eq!(&bytes[..6], b"\x93NUMPY");
        let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0);
        assert!(std::str::from_utf8(&bytes[10..10 + hlen])
            .unwrap()
            .contains("'shape': (1, 2, 2)"));
        assert_eq!(bytes.len(), 10 + hlen + 4 * 4);
        assert!(load(&dir.path().join("missing.safetensors"))
            .unwrap_err()
            .to_string()
            .contains("safegeo carriers"));
    }
}
