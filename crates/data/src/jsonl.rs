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

/// A resumable measurement log: a header line with the run's fingerprint (the SHA-256 of its
/// identity: everything the measurements depend on), then one `{"key", "value"}` line per
/// finished measurement. Opened with the same identity it hands back what was measured; with
/// another, it starts afresh, so a stale log can never leak into a different run.
pub struct Journal<V> {
    done: std::collections::HashMap<String, V>,
    out: Appender,
}

impl<V: Serialize + DeserializeOwned> Journal<V> {
    /// Open (or start) the journal at `path` for a run identified by `identity`.
    pub fn open(path: &Path, identity: &impl Serialize) -> Result<Self> {
        let identity =
            serde_json::to_string(identity).map_err(|e| Error::Invalid(e.to_string()))?;
        let fingerprint = crate::datasets::sha256(identity.as_bytes());
        let lines: Vec<serde_json::Value> = read(path)?;
        let same =
            lines.first().and_then(|h| h["fingerprint"].as_str()) == Some(fingerprint.as_str());
        let mut done = std::collections::HashMap::new();
        if same {
            for l in &lines[1..] {
                if let (Some(k), Ok(v)) = (
                    l["key"].as_str(),
                    serde_json::from_value::<V>(l["value"].clone()),
                ) {
                    done.insert(k.to_string(), v);
                }
            }
        } else if path.exists() {
            tracing::info!("{}: another run's journal, starting afresh", path.display());
            std::fs::remove_file(path).map_err(|e| Error::io(path, e))?;
        }
        let mut out = Appender::open(path)?;
        if !same {
            out.push(&serde_json::json!({ "fingerprint": fingerprint }))?;
        }
        Ok(Self { done, out })
    }

    /// The measurement recorded under `key`, if any.
    pub fn get(&self, key: &str) -> Option<&V> {
        self.done.get(key)
    }

    /// Record a finished measurement (flushed before this returns).
    pub fn put(&mut self, key: &str, value: V) -> Result<()> {
        self.out
            .push(&serde_json::json!({ "key": key, "value": &value }))?;
        self.done.insert(key.to_string(), value);
        Ok(())
    }

    /// Measurements recorded so far.
    pub fn len(&self) -> usize {
        self.done.len()
    }

    /// No measurement recorded yet.
    pub fn is_empty(&self) -> bool {
        self.done.is_empty()
    }
}

/// The value recorded under `key` in `journal`, or `measure()`, recorded there when there is a
/// journal: how a resumable computation skips what a killed run already finished.
pub fn journaled<V, E>(
    journal: &mut Option<&mut Journal<V>>,
    key: &str,
    measure: impl FnOnce() -> std::result::Result<V, E>,
) -> std::result::Result<V, E>
where
    V: Clone + Serialize + DeserializeOwned,
    E: From<Error>,
{
    if let Some(v) = journal.as_deref().and_then(|j| j.get(key)) {
        return Ok(v.clone());
    }
    let v = measure()?;
    if let Some(j) = journal.as_deref_mut() {
        j.put(key, v.clone())?;
    }
    Ok(v)
}

/// [`journaled`] for several keys measured together (in one batch whose composition can
/// change the last bits): when every key is recorded the recorded values come back; otherwise
/// `measure` measures the whole group again, as the interrupted run did, the recorded values
/// are kept and the others recorded. So a resumed run equals an uninterrupted one bit for bit.
pub fn journaled_many<V, E>(
    journal: &mut Option<&mut Journal<V>>,
    keys: &[String],
    measure: impl FnOnce() -> std::result::Result<Vec<V>, E>,
) -> std::result::Result<Vec<V>, E>
where
    V: Clone + Serialize + DeserializeOwned,
    E: From<Error>,
{
    let recorded: Vec<Option<V>> = keys
        .iter()
        .map(|k| journal.as_deref().and_then(|j| j.get(k)).cloned())
        .collect();
    if recorded.iter().all(Option::is_some) {
        return Ok(recorded.into_iter().flatten().collect());
    }
    let values = measure()?;
    if values.len() != keys.len() {
        return Err(E::from(Error::Invalid(format!(
            "measured {} values for {} keys",
            values.len(),
            keys.len()
        ))));
    }
    let mut out = Vec::with_capacity(keys.len());
    for ((key, old), new) in keys.iter().zip(recorded).zip(values) {
        match old {
            Some(v) => out.push(v),
            None => {
                if let Some(j) = journal.as_deref_mut() {
                    j.put(key, new.clone())?;
                }
                out.push(new);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_resumes_with_the_same_fingerprint_and_restarts_with_another() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j.jsonl");
        let mut j = Journal::<(f64, f64)>::open(&p, &"run-a").unwrap();
        j.put("0/1", (0.1 + 0.2, -1e-300)).unwrap();
        j.put("0/2", (f64::MAX, 1.0 / 3.0)).unwrap();
        drop(j);
        // A torn record from a kill is dropped; whole ones come back bit for bit.
        let mut bytes = std::fs::read(&p).unwrap();
        bytes.extend_from_slice(b"{\"key\":\"0/3\",\"val");
        std::fs::write(&p, bytes).unwrap();
        let mut j = Journal::<(f64, f64)>::open(&p, &"run-a").unwrap();
        assert_eq!(j.len(), 2);
        assert_eq!(j.get("0/1"), Some(&(0.1 + 0.2, -1e-300)));
        assert_eq!(j.get("0/2"), Some(&(f64::MAX, 1.0 / 3.0)));
        assert_eq!(j.get("0/3"), None);
        j.put("0/3", (3.0, 3.0)).unwrap();
        drop(j);
        assert_eq!(Journal::<(f64, f64)>::open(&p, &"run-a").unwrap().len(), 3);
        let j = Journal::<(f64, f64)>::open(&p, &"run-b").unwrap();
        assert!(j.is_empty());
        drop(j);
        assert!(Journal::<(f64, f64)>::open(&p, &"run-a")
            .unwrap()
            .is_empty());
    }

    #[test]
    fn journaled_many_keeps_recorded_values_and_records_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j.jsonl");
        let mut j = Journal::<f64>::open(&p, &"run").unwrap();
        j.put("b", 2.0).unwrap();
        let keys: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let mut calls = 0;
        let mut measure = || {
            calls += 1;
            Ok::<_, Error>(vec![10.0, 11.0, 12.0])
        };
        let got = journaled_many(&mut Some(&mut j), &keys, &mut measure).unwrap();
        // The group is measured whole; "b" keeps its recorded value.
        assert_eq!(got, vec![10.0, 2.0, 12.0]);
        assert_eq!(
            (j.get("a"), j.get("b"), j.get("c")),
            (Some(&10.0), Some(&2.0), Some(&12.0))
        );
        // Everything recorded: nothing is measured again.
        let again = journaled_many(&mut Some(&mut j), &keys, &mut measure).unwrap();
        assert_eq!((again, calls), (got, 1));
        // A measurement that returns the wrong count is an error, not a silent mismatch.
        let wrong = journaled_many::<f64, Error>(&mut None, &keys, || Ok(vec![1.0]));
        assert!(wrong.is_err());
    }

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
