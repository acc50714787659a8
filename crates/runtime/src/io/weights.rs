//! Where weights come from: a GGUF file (any quantization candle reads, dequantized to f32) or a
//! Hugging Face safetensors folder. Tensors are asked for by their GGUF names; HF names are mapped.
use crate::config::Arch;
use crate::{Error, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A source of named weight tensors.
pub enum WeightSource {
    /// A GGUF file.
    Gguf {
        /// File path.
        path: PathBuf,
        /// Parsed header.
        content: Content,
        /// Open file for tensor reads.
        file: Mutex<BufReader<File>>,
    },
    /// Safetensors shards of a HF folder.
    Safetensors {
        /// Folder path.
        path: PathBuf,
        /// Memory-mapped shards.
        st: candle_core::safetensors::MmapedSafetensors,
        /// Family (for name mapping).
        arch: Arch,
    },
    /// Tensors held in memory under GGUF names (tiny test models, edited weights).
    Memory(std::collections::HashMap<String, Tensor>),
}

/// Open a GGUF file, turning every way it can be broken into [`Error::BadGguf`].
pub fn open_gguf(path: &Path) -> Result<(Content, BufReader<File>)> {
    let bad = |reason: String| Error::BadGguf {
        path: path.to_path_buf(),
        reason,
    };
    let file = File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::ModelNotFound {
            path: path.to_path_buf(),
        },
        _ => Error::io(path, e),
    })?;
    let mut reader = BufReader::new(file);
    let mut magic = [0u8; 4];
    reader
        .read_exact(&mut magic)
        .map_err(|_| bad("file is shorter than a GGUF header".into()))?;
    if &magic != b"GGUF" {
        return Err(bad(format!("bad magic {magic:02x?} (expected \"GGUF\")")));
    }
    use std::io::Seek;
    let file_len = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    reader.rewind().map_err(|e| Error::io(path, e))?;
    crate::io::gguf_check::check_header(&mut reader, file_len).map_err(bad)?;
    reader.rewind().map_err(|e| Error::io(path, e))?;
    let content = Content::read(&mut reader).map_err(|e| bad(e.to_string()))?;
    for (name, info) in &content.tensor_infos {
        let (n, block) = (info.shape.elem_count(), info.ggml_dtype.block_size());
        if n % block != 0 {
            return Err(bad(format!(
                "tensor `{name}` has {n} elements, not a multiple of its {:?} block of {block}",
                info.ggml_dtype
            )));
        }
        let bytes = (n / block) as u64 * info.ggml_dtype.type_size() as u64;
        // Checked: a crafted offset near 2^64 must not wrap around to a small `end`.
        let end = content
            .tensor_data_offset
            .checked_add(info.offset)
            .and_then(|x| x.checked_add(bytes));
        match end {
            Some(end) if end <= file_len => {}
            _ => {
                return Err(bad(format!(
                    "tensor `{name}` (offset {}, {bytes} bytes) ends past the file's {file_len} bytes (truncated download?)",
                    info.offset
                )))
            }
        }
    }
    Ok((content, reader))
}

/// Read one GGUF tensor in its stored (possibly quantized) form.
fn read_gguf_tensor(
    path: &Path,
    content: &Content,
    file: &Mutex<BufReader<File>>,
    name: &str,
    info: &candle_core::quantized::gguf_file::TensorInfo,
    dev: &Device,
) -> Result<candle_core::quantized::QTensor> {
    let mut f = file
        .lock()
        .map_err(|_| Error::Invalid("weight file lock poisoned".into()))?;
    info.read(&mut *f, content.tensor_data_offset, dev)
        .map_err(|e| Error::BadGguf {
            path: path.to_path_buf(),
            reason: format!("tensor `{name}`: {e}"),
        })
}

/// HF checkpoint name of a tensor given its GGUF name.
pub(crate) fn hf_name(arch: Arch, gguf: &str) -> String {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return f.to_string();
    }
    let Some(rest) = gguf.strip_prefix("blk.") else {
        return gguf.to_string();
    };
    let (layer, tail) = rest.split_once('.').unwrap_or((rest, ""));
    let (module, suffix) = tail.rsplit_once('.').unwrap_or((tail, "weight"));
    let hf_module = match (module, arch) {
        ("attn_norm", _) => "input_layernorm",
        ("ffn_norm", Arch::Gemma3) => "pre_feedforward_layernorm",
        ("ffn_norm", _) => "post_attention_layernorm",
        ("post_attention_norm", _) => "post_attention_layernorm",
        ("post_ffw_norm", _) => "post_feedforward_layernorm",
        ("attn_q", _) => "self_attn.q_proj",
        ("attn_k", _) => "self_attn.k_proj",
        ("attn_v", _) => "self_attn.v_proj",
        ("attn_output", _) => "self_attn.o_proj",
        ("attn_q_norm", _) => "self_attn.q_norm",
        ("attn_k_norm", _) => "self_attn.k_norm",
        ("ffn_gate", _) => "mlp.gate_proj",
        ("ffn_up", _) => "mlp.up_proj",
        ("ffn_down", _) => "mlp.down_proj",
        (other, _) => other,
    };
    format!("model.layers.{layer}.{hf_module}.{suffix}")
}

/// `dir/name` when it stays inside `dir`: no absolute path, no `..`, and no link that resolves
/// outside the folder. `index` is the file that names it, for the error.
fn inside_folder(dir: &Path, index: &Path, name: &str) -> Result<PathBuf> {
    let outside = || Error::OutsideModel {
        index: index.to_path_buf(),
        name: name.to_string(),
        dir: dir.to_path_buf(),
    };
    let rel = Path::new(name);
    if !rel
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)))
    {
        return Err(outside());
    }
    let path = dir.join(rel);
    if let (Ok(real), Ok(root)) = (path.canonicalize(), dir.canonicalize()) {
        if !real.starts_with(&root) {
            return Err(outside());
        }
    }
    Ok(path)
}

/// `t` has `shape` and only finite values, or a named model error: a tensor whose dimensions
/// disagree with the configuration would fail deep inside a kernel, and a NaN would run to a
/// garbage result. The finiteness check reads the weight once more (`0 x` is 0 exactly when `x`
/// is finite), a fraction of what loading it costs.
pub(crate) fn check_weight(path: &Path, name: &str, t: &Tensor, shape: &[usize]) -> Result<()> {
    if t.dims() != shape {
        return Err(Error::ShapeMismatch {
            path: path.to_path_buf(),
            name: name.to_string(),
            expected: shape.to_vec(),
            found: t.dims().to_vec(),
        });
    }
    let zero = t
        .affine(0.0, 0.0)?
        .sum_all()?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()?;
    if zero != 0.0 {
        return Err(Error::NonFinite {
            path: path.to_path_buf(),
            name: name.to_string(),
        });
    }
    Ok(())
}

impl WeightSource {
    /// Open a safetensors folder (`model.safetensors` or a sharded index).
    pub fn open_safetensors(dir: &Path, arch: Arch) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::Invalid(format!("{}: {e}", index.display())))?;
            let mut shards: Vec<String> = json["weight_map"]
                .as_object()
                .ok_or_else(|| Error::MissingKey {
                    path: index.clone(),
                    key: "weight_map".into(),
                })?
                .values()
                .filter_map(|v| v.as_str().map(String::from))
                .collect();
            shards.sort();
            shards.dedup();
            shards
                .into_iter()
                .map(|s| inside_folder(dir, &index, &s))
                .collect::<Result<_>>()?
        } else {
            let mut f: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| Error::io(dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            f.sort();
            f
        };
        if files.is_empty() {
            return Err(Error::MissingTensor {
                path: dir.to_path_buf(),
                name: "*.safetensors".into(),
            });
        }
        for f in &files {
            if !f.exists() {
                return Err(Error::ModelNotFound { path: f.clone() });
            }
            // A shard that is a link out of the folder is refused like a `../` name.
            let name = f.file_name().unwrap_or_default().to_string_lossy();
            inside_folder(dir, f, &name)?;
        }
        // SAFETY: the files are memory-mapped read-only; modifying them while safegeo runs is
        // undefined, as for every mmap-based loader.
        let st =
            unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }.map_err(|e| {
                Error::BadSafetensors {
                    path: dir.to_path_buf(),
                    reason: e.to_string(),
                }
            })?;
        Ok(WeightSource::Safetensors {
            path: dir.to_path_buf(),
            st,
            arch,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        match self {
            WeightSource::Gguf { path, .. } | WeightSource::Safetensors { path, .. } => path,
            WeightSource::Memory(_) => Path::new("<memory>"),
        }
    }

    /// Whether a tensor exists.
    pub fn has(&self, name: &str) -> bool {
        match self {
            WeightSource::Gguf { content, .. } => content.tensor_infos.contains_key(name),
            WeightSource::Safetensors { st, arch, .. } => st.get(&hf_name(*arch, name)).is_ok(),
            WeightSource::Memory(m) => m.contains_key(name),
        }
    }

    /// A tensor as f32 on `dev`, by GGUF name.
    pub fn get(&self, name: &str, dev: &Device) -> Result<Tensor> {
        let missing = || Error::MissingTensor {
            path: self.path().to_path_buf(),
            name: name.into(),
        };
        match self {
            WeightSource::Gguf {
                path,
                content,
                file,
            } => {
                let info = content.tensor_infos.get(name).ok_or_else(missing)?;
                let q = read_gguf_tensor(path, content, file, name, info, dev)?;
                q.dequantize(dev).map_err(|e| Error::UnsupportedQuant {
                    path: path.clone(),
                    tensor: name.into(),
                    dtype: format!("{:?} ({e})", info.ggml_dtype),
                })
            }
            WeightSource::Safetensors { st, arch, .. } => {
                let hf = hf_name(*arch, name);
                let t = st
                    .load(&hf, dev)
                    .map_err(|_| missing())?
                    .to_dtype(DType::F32)?;
                // HF Gemma stores norm weights as w with y = x * (1 + w); GGUF stores 1 + w.
                if *arch == Arch::Gemma3 && name.ends_with("norm.weight") {
                    Ok((t + 1.0)?)
                } else {
                    Ok(t)
                }
            }
            WeightSource::Memory(m) => Ok(m.get(name).ok_or_else(missing)?.to_device(dev)?),
        }
    }

    /// A tensor as [`WeightSource::get`] reads it, refused unless it has `shape` and only finite
    /// values ([`check_weight`]).
    pub fn get_shaped(&self, name: &str, shape: &[usize], dev: &Device) -> Result<Tensor> {
        let t = self.get(name, dev)?;
        check_weight(self.path(), name, &t, shape)?;
        Ok(t)
    }

    /// The quantized form of a GGUF tensor (`None` for other sources or unquantized types).
    pub fn get_quantized(
        &self,
        name: &str,
        dev: &Device,
    ) -> Result<Option<candle_core::quantized::QTensor>> {
        let WeightSource::Gguf {
            path,
            content,
            file,
        } = self
        else {
            return Ok(None);
        };
        let Some(info) = content.tensor_infos.get(name) else {
            return Ok(None);
        };
        use candle_core::quantized::GgmlDType;
        if matches!(
            info.ggml_dtype,
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
        ) {
            return Ok(None);
        }
        read_gguf_tensor(path, content, file, name, info, dev).map(Some)
    }

    /// An optional tensor.
    pub fn get_opt(&self, name: &str, dev: &Device) -> Result<Option<Tensor>> {
        if self.has(name) {
            self.get(name, dev).map(Some)
        } else {
            Ok(None)
        }
    }
}

/// Typed access to GGUF metadata with errors naming the key.
pub struct Meta<'a> {
    /// Header.
    pub content: &'a Content,
    /// File (for messages).
    pub path: &'a Path,
    /// Architecture prefix (`llama`, `gemma3`, ...).
    pub prefix: String,
}

impl Meta<'_> {
    fn value(&self, key: &str) -> Result<&Value> {
        let full = format!("{}.{key}", self.prefix);
        self.content.metadata.get(&full).ok_or(Error::MissingKey {
            path: self.path.to_path_buf(),
            key: full,
        })
    }

    /// A required integer.
    pub fn usize(&self, key: &str) -> Result<usize> {
        let v = self.value(key)?;
        let n = v
            .to_u64()
            .or_else(|_| v.to_u32().map(u64::from))
            .or_else(|_| v.to_i32().map(|x| x.max(0) as u64))?;
        Ok(n as usize)
    }

    /// An optional integer.
    pub fn usize_opt(&self, key: &str) -> Option<usize> {
        self.usize(key).ok()
    }

    /// An optional float.
    pub fn f64_opt(&self, key: &str) -> Option<f64> {
        let v = self.value(key).ok()?;
        v.to_f32().map(f64::from).or_else(|_| v.to_f64()).ok()
    }

    /// A required float.
    pub fn f64(&self, key: &str) -> Result<f64> {
        self.f64_opt(key).ok_or(Error::MissingKey {
            path: self.path.to_path_buf(),
            key: format!("{}.{key}", self.prefix),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_names_map_per_family() {
        assert_eq!(
            hf_name(Arch::Llama, "blk.3.attn_q.weight"),
            "model.layers.3.self_attn.q_proj.weight"
        );
        assert_eq!(
            hf_name(Arch::Qwen2, "blk.0.attn_k.bias"),
            "model.layers.0.self_attn.k_proj.bias"
        );
        assert_eq!(
            hf_name(Arch::Llama, "blk.1.ffn_norm.weight"),
            "model.layers.1.post_attention_layernorm.weight"
        );
        assert_eq!(
            hf_name(Arch::Gemma3, "blk.1.ffn_norm.weight"),
            "model.layers.1.pre_feedforward_layernorm.weight"
        );
        assert_eq!(
            hf_name(Arch::Gemma3, "blk.1.post_attention_norm.weight"),
            "model.layers.1.post_attention_layernorm.weight"
        );
        assert_eq!(
            hf_name(Arch::Llama, "token_embd.weight"),
            "model.embed_tokens.weight"
        );
    }

    #[test]
    fn broken_gguf_files_are_named_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.gguf");
        std::fs::write(&p, b"GG").unwrap();
        assert!(matches!(open_gguf(&p), Err(Error::BadGguf { .. })));
        std::fs::write(&p, b"NOTAGGUFFILE").unwrap();
        let e = open_gguf(&p).unwrap_err();
        assert!(e.to_string().contains("bad magic"), "{e}");
        std::fs::write(
            &p,
            b"GGUF\x03\0\0\0\xff\xff\xff\xff\xff\xff\xff\x00\x01\0\0\0\0\0\0\0",
        )
        .unwrap();
        assert!(matches!(open_gguf(&p), Err(Error::BadGguf { .. })));
        assert!(matches!(
            open_gguf(&dir.path().join("none.gguf")),
            Err(Error::ModelNotFound { .. })
        ));
    }

    /// A GGUF v3 file with one tensor of `dims` and ggml type `dtype` at `offset`, followed by
    /// `data_len` bytes of tensor data.
    fn one_tensor_gguf(dims: &[u64], dtype: u32, offset: u64, data_len: usize) -> Vec<u8> {
        use crate::io::gguf_check::build::{header, tensor_info};
        let mut b = header(1, 0);
        tensor_info(&mut b, dims, dtype, offset);
        b.resize(b.len().div_ceil(32) * 32, 0);
        b.resize(b.len() + data_len, 1);
        b
    }

    #[test]
    fn tensor_offsets_and_quant_blocks_are_checked_without_wrapping() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.gguf");
        let open = |bytes: Vec<u8>| {
            std::fs::write(&p, bytes).unwrap();
            open_gguf(&p).map(|_| ()).map_err(|e| e.to_string())
        };
        // F32 [4] = 16 bytes: fits, then one byte short.
        assert!(open(one_tensor_gguf(&[4], 0, 0, 16)).is_ok());
        let e = open(one_tensor_gguf(&[4], 0, 0, 15)).unwrap_err();
        assert!(e.contains("ends past the file"), "{e}");
        // An offset near 2^64 used to wrap the end back into the file.
        let e = open(one_tensor_gguf(&[4], 0, u64::MAX - 8, 64)).unwrap_err();
        assert!(e.contains("ends past the file"), "{e}");
        // Q4_0 (type 2) stores blocks of 32 elements: 33 elements cannot be stored.
        let e = open(one_tensor_gguf(&[33], 2, 0, 64)).unwrap_err();
        assert!(e.contains("not a multiple of its Q4_0 block of 32"), "{e}");
    }
}
