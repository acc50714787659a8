//! Crash-safe result files: the bytes go to `NAME.tmp` beside the target, are forced to disk,
//! and the temp file is renamed over the target. A kill at any point leaves either the old file
//! or the new one, whole; never a torn one.
use crate::{Error, Result};
use candle_core::Tensor;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// `dir/NAME.tmp` for `dir/NAME` (the whole name is kept, so `a.csv` and `a.json` never share one).
fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Force `tmp` to disk and rename it to `path`, then force the directory entry.
fn persist(tmp: &Path, path: &Path) -> Result<()> {
    std::fs::File::open(tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(tmp, e))?;
    std::fs::rename(tmp, path).map_err(|e| Error::io(path, e))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // Best effort: some filesystems refuse to sync a directory handle.
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}

/// Write `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    {
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
    }
    persist(&tmp, path)
}

/// Write named tensors as a `.safetensors` file atomically.
pub fn save_tensors_atomic(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let tmp = tmp_path(path);
    candle_core::safetensors::save(tensors, &tmp)?;
    persist(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_files_and_leaves_no_temp_behind() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.csv");
        write_atomic(&p, b"old").unwrap();
        // A temp file left by a killed writer is simply overwritten.
        std::fs::write(dir.path().join("a.csv.tmp"), b"torn").unwrap();
        write_atomic(&p, b"new").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        assert!(!dir.path().join("a.csv.tmp").exists());
        assert_eq!(
            tmp_path(&dir.path().join("a.json")),
            dir.path().join("a.json.tmp")
        );

        let t = Tensor::new(&[1f32, 2., 3.], &candle_core::Device::Cpu).unwrap();
        let q = dir.path().join("t.safetensors");
        save_tensors_atomic(&HashMap::from([("t".to_string(), t)]), &q).unwrap();
        let back = candle_core::safetensors::load(&q, &candle_core::Device::Cpu).unwrap();
        assert_eq!(back["t"].to_vec1::<f32>().unwrap(), vec![1., 2., 3.]);
    }
}
