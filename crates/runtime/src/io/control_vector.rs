//! llama.cpp control vectors: a GGUF of architecture `controlvector` with one f32 tensor
//! `direction.N` per steered layer. llama.cpp adds `direction.N` (times the scale given to
//! `--control-vector-scaled`) to the output of its block `N` (0-based) at every position, and
//! never steers block 0's output. safegeo's layer `l` is the input of block `l`, the output of
//! block `l - 1`: a carrier at safegeo layer `l` goes to `direction.{l - 1}`, and layers 0 and 1
//! cannot be written. A control vector only adds a direction; it cannot ablate one.
use crate::{Error, Result};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::path::Path;

/// The llama.cpp direction index that adds at safegeo layer `layer` (`None` for 0 and 1).
pub fn llama_cpp_index(layer: usize) -> Option<usize> {
    (layer >= 2).then(|| layer - 1)
}

/// Write `vector` (already scaled) as a control vector that adds it at safegeo layer `layer` of a
/// model with `n_layer` blocks of architecture `model_hint`: `direction.1` to
/// `direction.{n_layer - 1}`, zero but at the layer's index.
pub fn write_control_vector(
    path: &Path,
    vector: &[f32],
    layer: usize,
    n_layer: usize,
    model_hint: &str,
) -> Result<()> {
    let index = llama_cpp_index(layer).filter(|_| layer < n_layer).ok_or_else(|| {
        Error::Invalid(format!(
            "a llama.cpp control vector cannot add at layer {layer}: llama.cpp steers the outputs of blocks 1-{} (safegeo layers 2-{})\n  fix: pick a carrier at layer 2 or above",
            n_layer.saturating_sub(2),
            n_layer.saturating_sub(1)
        ))
    })?;
    let d = vector.len();
    let tensors = (1..n_layer)
        .map(|i| {
            let v = if i == index {
                vector.to_vec()
            } else {
                vec![0f32; d]
            };
            let t = Tensor::from_vec(v, d, &Device::Cpu)?;
            Ok((
                format!("direction.{i}"),
                QTensor::quantize(&t, GgmlDType::F32)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = [
        (
            "general.architecture",
            Value::String("controlvector".into()),
        ),
        ("controlvector.model_hint", Value::String(model_hint.into())),
        (
            "controlvector.layer_count",
            Value::U32((n_layer - 1) as u32),
        ),
    ];
    let mut bytes = Vec::new();
    gguf_file::write(
        &mut std::io::Cursor::new(&mut bytes),
        &meta.iter().map(|(k, v)| (*k, v)).collect::<Vec<_>>(),
        &tensors
            .iter()
            .map(|(n, t)| (n.as_str(), t))
            .collect::<Vec<_>>(),
    )?;
    crate::io::files::write_atomic(path, &bytes)
}

/// The directions of a control vector file, by llama.cpp index.
pub fn read_control_vector(path: &Path) -> Result<Vec<(usize, Vec<f32>)>> {
    let (content, mut reader) = crate::io::weights::open_gguf(path)?;
    let mut out = Vec::new();
    for (name, info) in &content.tensor_infos {
        let Some(i) = name.strip_prefix("direction.").and_then(|i| i.parse().ok()) else {
            continue;
        };
        let t = info.read(&mut reader, content.tensor_data_offset, &Device::Cpu)?;
        out.push((i, t.dequantize(&Device::Cpu)?.to_vec1::<f32>()?));
    }
    out.sort_by_key(|(i, _)| *i);
    Ok(out)
}
