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

/// Write `bytes` to `path` atomically. On failure (a full disk, say) the temp file is removed
/// and the old file, if any, is left as it was.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(|e| Error::io(&tmp, e))
        .and_then(|()| persist(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Write named tensors as a `.safetensors` file atomically (the temp file removed on failure).
pub fn save_tensors_atomic(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let tmp = tmp_path(path);
    // The safetensors writer creates its file private (0600); every other result file has
    // 0666 less the umask, which a file created here first shows, and the written file gets.
    let saved = std::fs::File::create(&tmp)
        .and_then(|f| f.metadata())
        .map_err(|e| Error::io(&tmp, e))
        .and_then(|meta| {
            candle_core::safetensors::save(tensors, &tmp)?;
            std::fs::set_permissions(&tmp, meta.permissions()).map_err(|e| Error::io(&tmp, e))
        })
        .and_then(|()| persist(&tmp, path));
    if saved.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    saved
}

/// Write named tensors as f32 in a `.safetensors` file atomically, with `metadata` as the
/// header's `__metadata__` (what the file is, where it came from: readers such as
/// `safetensors.safe_open(...).metadata()` show it). The header is written with its keys sorted
/// and the tensors in name order, so the same tensors and metadata give the same bytes (the
/// safetensors crate writes its metadata map in hash order).
pub fn save_f32_tensors_with_metadata(
    tensors: &HashMap<String, Tensor>,
    metadata: &std::collections::BTreeMap<String, String>,
    path: &Path,
) -> Result<()> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!(metadata));
    let mut data = Vec::new();
    for name in names {
        let t = &tensors[name];
        let values: Vec<f32> = t
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let start = data.len();
        data.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": t.dims(), "data_offsets": [start, data.len()]}),
        );
    }
    let mut head = serde_json::to_vec(&header).map_err(|e| Error::Invalid(e.to_string()))?;
    // The data starts on an 8-byte boundary, the header padded with spaces as the format allows.
    head.resize(head.len().next_multiple_of(8), b' ');
    let mut bytes = Vec::with_capacity(8 + head.len() + data.len());
    bytes.extend((head.len() as u64).to_le_bytes());
    bytes.extend(head);
    bytes.extend(data);
    write_atomic(path, &bytes)
}

/// The output folders this process holds, so a command that calls another (trajectory, demo)
/// never waits on its own lock; the files stay open, and so locked, until the process ends.
static HELD: std::sync::Mutex<Vec<(PathBuf, std::fs::File)>> = std::sync::Mutex::new(Vec::new());

/// Take the advisory lock of output folder `dir` (creating it) for the rest of the process: one
/// writer per folder. A second run on the same folder fails at once, naming the holder's PID,
/// instead of gluing its records to the first run's. The lock is `dir/.safegeo.lock` (an
/// `flock`; the kernel releases it when the holder exits, however it exits).
pub fn lock_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let key = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
    let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
    if held.iter().any(|(p, _)| *p == key) {
        return Ok(());
    }
    let path = dir.join(".safegeo.lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = std::io::Read::read_to_string(&mut file, &mut pid);
            let holder = match pid.trim() {
                "" => "another safegeo run".to_string(),
                p => format!("another safegeo run (PID {p})"),
            };
            return Err(Error::Busy {
                path: dir.to_path_buf(),
                holder,
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
    }
    file.set_len(0).map_err(|e| Error::io(&path, e))?;
    write!(file, "{}", std::process::id()).map_err(|e| Error::io(&path, e))?;
    held.push((key, file));
    Ok(())
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
        // Tensors files get the same mode as every other result file.
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&q), mode(&p));
    }

    #[test]
    fn a_failed_write_leaves_no_temp_file_and_the_old_file_whole() {
        let dir = tempfile::tempdir().unwrap();
        // The rename fails: the target is a folder that holds a file.
        let target = dir.path().join("results.csv");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("keep"), b"old").unwrap();
        assert!(write_atomic(&target, b"new").is_err());
        assert!(!dir.path().join("results.csv.tmp").exists());
        assert_eq!(std::fs::read(target.join("keep")).unwrap(), b"old");
        let t = Tensor::new(&[1f32], &candle_core::Device::Cpu).unwrap();
        let tensors = HashMap::from([("t".to_string(), t)]);
        assert!(save_tensors_atomic(&tensors, &target).is_err());
        assert!(!dir.path().join("results.csv.tmp").exists());
    }

    #[test]
    fn a_folder_is_locked_once_per_process_and_names_its_holder() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        lock_dir(&out).unwrap();
        // Again from this process: already held, fine.
        lock_dir(&out).unwrap();
        let pid = std::fs::read_to_string(out.join(".safegeo.lock")).unwrap();
        assert_eq!(pid, std::process::id().to_string());
        // Another open file description (as another process would have) cannot take it.
        let other = std::fs::File::open(out.join(".safegeo.lock")).unwrap();
        assert!(matches!(
            other.try_lock(),
            Err(std::fs::TryLockError::WouldBlock)
        ));
    }

    #[test]
    fn metadata_lands_in_the_safetensors_header() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("m.safetensors");
        let t = Tensor::new(&[[1f32, 2.], [3., 4.]], &candle_core::Device::Cpu).unwrap();
        let meta = std::collections::BTreeMap::from([
            ("model_sha256".to_string(), "abc".to_string()),
            ("format".to_string(), "test".to_string()),
        ]);
        let tensors = HashMap::from([("t".to_string(), t.clone()), ("a".to_string(), t)]);
        save_f32_tensors_with_metadata(&tensors, &meta, &q).unwrap();
        let bytes = std::fs::read(&q).unwrap();
        // The same input gives the same bytes.
        save_f32_tensors_with_metadata(&tensors, &meta, &q).unwrap();
        assert_eq!(std::fs::read(&q).unwrap(), bytes);
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(header.metadata().as_ref().unwrap()["model_sha256"], "abc");
        let back = candle_core::safetensors::load(&q, &candle_core::Device::Cpu).unwrap();
        assert_eq!(
            back["t"].to_vec2::<f32>().unwrap(),
            vec![vec![1., 2.], vec![3., 4.]]
        );
        assert!(!dir.path().join("m.safetensors.tmp").exists());
    }
}
