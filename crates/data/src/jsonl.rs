//! Crash-safe JSONL result files: one record per line, appended and flushed per record, read
//! back on resume. A run killed mid-write leaves at most one torn last line; reading drops it and
//! appending first cuts it off, so the next record starts on a line of its own.
use crate::{Error, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io::{BufRead, Seek, Write};
use std::path::{Path, PathBuf};

/// Every readable record of `path` (none if the file does not exist). Unreadable lines are
/// dropped with a warning: their items are simply redone.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(path, e)),
    };
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| Error::io(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(&line) {
            Ok(r) => out.push(r),
            Err(e) => tracing::warn!(
                "{} line {}: unreadable record dropped ({e})",
                path.display(),
                i + 1
            ),
        }
    }
    Ok(out)
}

/// An append-only JSONL writer.
pub struct Appender {
    file: std::fs::File,
    path: PathBuf,
}

impl Appender {
    /// Open `path` for appending, creating it, and cut off a torn last line.
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        if keep < bytes.len() {
            tracing::warn!(
                "{}: cutting off a torn last line ({} bytes)",
                path.display(),
                bytes.len() - keep
            );
            file.set_len(keep as u64).map_err(|e| Error::io(path, e))?;
        }
        file.seek(std::io::SeekFrom::End(0))
            .map_err(|e| Error::io(path, e))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Append one record as a line and flush it to the OS.
    pub fn push<T: Serialize>(&mut self, record: &T) -> Result<()> {
        let mut line = serde_json::to_string(record).map_err(|e| Error::Invalid(e.to_string()))?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .map_err(|e| Error::io(&self.path, e))?;
        self.file.flush().map_err(|e| Error::io(&self.path, e))
    }

    /// Force what was appended to disk.
    pub fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| Error::io(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torn_last_line_is_dropped_and_cut_before_appending() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.jsonl");
        std::fs::write(&p, "{\"a\":1}\n{\"a\":2}\n{\"a\":").unwrap();
        let records: Vec<serde_json::Value> = read(&p).unwrap();
        assert_eq!(records.len(), 2);
        let mut app = Appender::open(&p).unwrap();
        app.push(&serde_json::json!({"a": 3})).unwrap();
        app.sync().unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text, "{\"a\":1}\n{\"a\":2}\n{\"a\":3}\n");
        let missing: Vec<serde_json::Value> = read(&dir.path().join("none.jsonl")).unwrap();
        assert!(missing.is_empty());
    }
}
