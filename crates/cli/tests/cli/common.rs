//! Helpers shared by the themed test modules: running the binary, tiny inputs, kill points.
pub use candle_core::quantized::gguf_file::{self, Value};
pub use candle_core::quantized::QTensor;
pub use candle_core::{Device, Tensor};
pub use safegeo_runtime::{testing::write_tiny_hf, Arch};
pub use std::path::Path;
pub use std::process::{Command, Output};

pub fn safegeo(args: &[&str], home: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_safegeo"))
        .args(args)
        .env("SAFEGEO_HOME", home)
        .env_remove("SAFEGEO_MODEL")
        .output()
        .unwrap()
}

pub fn fails_with(out: &Output, code: i32, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    assert!(err.contains(needle), "expected `{needle}` in: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(err.contains("fix:") || code == 2, "no fix given: {err}");
}

/// A JSONL suite of `n` two-word prompts of the tiny vocabulary, starting at word `lo`.
pub fn prompt_file(dir: &Path, name: &str, lo: usize, label: &str, n: usize) -> String {
    let p = dir.join(name);
    let rows: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "{{\"id\": \"{i}\", \"prompt\": \"w{} w{}\", \"label\": \"{label}\"}}",
                lo + i % 6,
                lo + (i * 5) % 9
            )
        })
        .collect();
    std::fs::write(&p, rows.join("\n")).unwrap();
    p.to_str().unwrap().to_string()
}

/// `dir/scenarios/` with one deception scenario in the tiny vocabulary (strategies refusal and
/// rebuttal).
pub fn tiny_scenarios(dir: &Path) -> std::path::PathBuf {
    let scen = dir.join("scenarios");
    std::fs::create_dir_all(&scen).unwrap();
    std::fs::write(
        scen.join("tiny.toml"),
        r#"name = "tiny"
kind = "unethical"
system = "w1 w2"
pressure = "w3 w4"
pressure2 = "w5"
act = "w6"
format = "w7"
[first_reply]
refusal = "w8"
rebuttal = "w9 w10"
[heuristic]
act = ["w1"]
"#,
    )
    .unwrap();
    scen
}

pub fn write_gguf(path: &Path, arch: &str) {
    let mut f = std::fs::File::create(path).unwrap();
    let arch = Value::String(arch.into());
    let t = QTensor::quantize(
        &Tensor::zeros((4, 4), candle_core::DType::F32, &Device::Cpu).unwrap(),
        candle_core::quantized::GgmlDType::F32,
    )
    .unwrap();
    gguf_file::write(
        &mut f,
        &[("general.architecture", &arch)],
        &[("token_embd.weight", &t)],
    )
    .unwrap();
}

pub fn records(dir: &Path) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = std::fs::read_to_string(dir.join("records.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let r: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                r["id"].as_str().unwrap().to_string(),
                r["response"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

/// `trajectory`'s carrier and selection options sized for a tiny model (`sets` = harmful,harmless).
pub fn tiny_geometry_args(sets: &str) -> Vec<String> {
    [
        "--carrier-sets",
        sets,
        "--val",
        sets,
        "--n-carrier",
        "8",
        "--n-val",
        "4",
        "--screen",
        "2",
        "--finalists",
        "2",
        "--kl-max",
        "50",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Run `args` and SIGKILL it once `ready()`; true when it was killed before it finished. A child
/// that exits by itself before the kill point panics with its exit status and stderr, so a crash is
/// never mistaken for a run that was too quick to interrupt.
pub fn kill_when(args: &[&str], home: &Path, ready: impl Fn() -> bool) -> bool {
    let stderr_path = home.join(format!(
        "kill-when-{}.stderr",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let mut child = Command::new(env!("CARGO_BIN_EXE_safegeo"))
        .args(args)
        .env("SAFEGEO_HOME", home)
        .env_remove("SAFEGEO_MODEL")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    let mut exited = None;
    while t0.elapsed() < std::time::Duration::from_secs(20) && !ready() {
        if let Some(status) = child.try_wait().unwrap() {
            exited = Some(status);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let exited = exited.or_else(|| child.try_wait().unwrap());
    let _ = child.kill();
    let _ = child.wait();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let _ = std::fs::remove_file(&stderr_path);
    if let Some(status) = exited {
        assert!(
            status.success(),
            "{args:?} failed before the kill point ({status}): {stderr}"
        );
        eprintln!(
            "{args:?} finished after {:?}, before the kill point",
            t0.elapsed()
        );
    }
    exited.is_none()
}

/// A minimal OpenAI-compatible endpoint on localhost that answers every request with `answer`
/// and records the Authorization headers it saw.
pub fn judge_server(
    answer: &'static str,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let auth = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = auth.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                if lower.starts_with("authorization:") {
                    seen.lock().unwrap().push(line.trim().to_string());
                }
            }
            let mut body = vec![0u8; len];
            let _ = reader.read_exact(&mut body);
            let reply =
                serde_json::json!({"choices": [{"message": {"content": answer}}]}).to_string();
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reply}",
                reply.len()
            );
        }
    });
    (url, auth)
}

/// A point in `lo..=hi` that differs from run to run (printed by the assertions that use it).
pub fn random_point(lo: usize, hi: usize) -> usize {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as usize;
    lo + nanos % (hi - lo + 1)
}

pub fn lines_in(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |s| s.lines().count())
}

/// `args` run whole into `full/`, and run into `cut/` killed with SIGKILL once
/// `ready(cut, took, elapsed)`, then resumed. `took` is the uninterrupted run's wall time and
/// `elapsed` the time since the cut run started. A run that finishes before its kill point (a cold
/// first run makes `took` long) is started again from scratch with `took` halved, up to five
/// times. Returns the two folders for the caller to compare and the resumed run's stderr.
pub fn full_and_resumed(
    h: &Path,
    name: &str,
    args: &dyn Fn(&Path) -> Vec<String>,
    ready: &dyn Fn(&Path, std::time::Duration, std::time::Duration) -> bool,
) -> (std::path::PathBuf, std::path::PathBuf, String) {
    let run = |out: &Path| {
        let a = args(out);
        let out = safegeo(&a.iter().map(String::as_str).collect::<Vec<_>>(), h);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let (full, cut) = (
        h.join(format!("{name}-full")),
        h.join(format!("{name}-cut")),
    );
    let t0 = std::time::Instant::now();
    run(&full);
    let mut took = t0.elapsed();
    let killed = (0..5).any(|_| {
        let _ = std::fs::remove_dir_all(&cut);
        let a = args(&cut);
        let started = std::time::Instant::now();
        let killed = kill_when(&a.iter().map(String::as_str).collect::<Vec<_>>(), h, || {
            ready(&cut, took, started.elapsed())
        });
        took /= 2;
        killed
    });
    assert!(
        killed,
        "{name}: five runs in a row finished before their kill point"
    );
    let log = run(&cut);
    (full, cut, log)
}

pub fn same_file(a: &Path, b: &Path, what: &str) {
    assert_eq!(
        std::fs::read(a).unwrap_or_else(|e| panic!("{}: {e}", a.display())),
        std::fs::read(b).unwrap_or_else(|e| panic!("{}: {e}", b.display())),
        "{what}: {} differs from the uninterrupted run",
        b.display()
    );
}

/// A JSON file without its wall-clock time and the path of its own folder.
pub fn json_without_seconds(path: &Path) -> String {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("seconds");
    let dir = path.parent().unwrap().to_str().unwrap();
    v.to_string().replace(dir, "DIR")
}
