//! Pieces every command shares: model resolution, device choice, prompt building.
use anyhow::{Context, Result};
use candle_core::Device;
use safegeo_runtime::fetch::{self, KnownModel};
use safegeo_runtime::{Message, Model};
use std::path::PathBuf;

/// `--model` and `--device`, flattened into every command that loads a model.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// A .gguf file, a Hugging Face folder, or a known model name [default: smollm2-135m-instruct,
    /// fetched on first use].
    #[arg(long, short = 'm', env = "SAFEGEO_MODEL")]
    pub model: Option<String>,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Keep a GGUF's quantized weights for decoding at batch 1-3 (faster; activations quantized
    /// to 8 bits as in llama.cpp, so logits differ slightly and near ties may swap). Larger
    /// products, gradients and edits use f32 (docs/architecture.md).
    #[arg(long)]
    pub quantized: bool,
}

/// `--device`, flattened into every command that runs a model.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct DeviceArgs {
    /// Device: cpu, or cuda[:N] in a build with the `cuda` feature.
    #[arg(long = "device", default_value = "cpu", value_name = "DEVICE")]
    pub name: String,
}

impl Default for DeviceArgs {
    fn default() -> Self {
        defaults()
    }
}

impl std::ops::Deref for DeviceArgs {
    type Target = str;
    fn deref(&self) -> &str {
        &self.name
    }
}

impl Default for ModelArgs {
    /// The default model on the default device.
    fn default() -> Self {
        ModelArgs {
            model: None,
            device: DeviceArgs::default(),
            quantized: false,
        }
    }
}

impl ModelArgs {
    /// The model at `model` (a path or known name) on `device`, as read in f32.
    pub fn of(model: &str, device: &DeviceArgs) -> Self {
        ModelArgs {
            model: Some(model.into()),
            device: device.clone(),
            quantized: false,
        }
    }
}

/// An argument group at the defaults clap declares for it, so a command that runs another's
/// code with most settings at their defaults states each default once. For groups whose every
/// argument has a default (or is optional).
pub fn defaults<T: clap::Args + clap::FromArgMatches>() -> T {
    let cmd = T::augment_args(clap::Command::new("defaults").no_binary_name(true));
    let matches = cmd
        .try_get_matches_from(std::iter::empty::<String>())
        .expect("every argument of the group has a default");
    T::from_arg_matches(&matches).expect("defaults parse")
}

static QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Silences progress and info messages for the rest of the run (`-q`).
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, std::sync::atomic::Ordering::Relaxed);
}

/// Whether `-q` was given.
pub fn quiet() -> bool {
    QUIET.load(std::sync::atomic::Ordering::Relaxed)
}

/// An info or progress line on stderr, unless `-q` silenced them.
macro_rules! note {
    ($($arg:tt)*) => {
        if !$crate::common::quiet() {
            eprintln!($($arg)*);
        }
    };
}
pub(crate) use note;

/// A judge of `eval` and `trajectory` (docs/protocol.md §4).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Judge {
    /// Arditi et al.'s refusal substrings.
    Substring,
    /// XSTest's refusal-opening matcher.
    XstestPrefix,
    /// The refusal-token log-odds at the first reply position (no reply needed).
    RefusalScore,
    /// HarmBench's classifier prompt (an LLM judge).
    Harmbench,
    /// StrongREJECT's rubric (an LLM judge).
    Strongreject,
    /// XSTest's three-class rubric (an LLM judge).
    Xstest,
    /// The three LLM judges through --judge-endpoint.
    Endpoint,
    /// The three LLM judges through --judge-model-path.
    Local,
}

impl Judge {
    /// The name on the command line and in results.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Substring => "substring",
            Self::XstestPrefix => "xstest-prefix",
            Self::RefusalScore => "refusal-score",
            Self::Harmbench => "harmbench",
            Self::Strongreject => "strongreject",
            Self::Xstest => "xstest",
            Self::Endpoint => "endpoint",
            Self::Local => "local",
        }
    }
}

impl serde::Serialize for Judge {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A number option's value: finite, so NaN and infinities never pass a range check unnoticed.
pub fn finite(s: &str) -> std::result::Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        Ok(v) => Err(format!("`{v}` is not a finite number")),
        Err(_) => Err(format!("`{s}` is not a number")),
    }
}

/// A count option that must be at least 1 (e.g. new tokens of a reply that will be judged).
pub fn at_least_one(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("0 leaves nothing to work on: use 1 or more".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("`{s}` is not a whole number")),
    }
}

/// `--judge-endpoint`: an http(s) URL with a host, checked before anything is generated.
pub fn endpoint_url(s: &str) -> std::result::Result<String, String> {
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
        .ok_or_else(|| {
            format!(
                "`{}` is not an http(s) URL (e.g. http://localhost:8000/v1)",
                safegeo_data::judges::llm::redact_url(s)
            )
        })?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = authority.rsplit('@').next().unwrap_or_default();
    if host.is_empty() || host.starts_with(':') {
        return Err(format!(
            "`{}` names no host (e.g. http://localhost:8000/v1)",
            safegeo_data::judges::llm::redact_url(s)
        ));
    }
    Ok(s.to_string())
}

/// `--data-dir`, flattened into every command that reads datasets.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DataArgs {
    /// Folder of the benchmark datasets [default: ../shared/data].
    #[arg(long, env = "SAFEGEO_DATA", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

/// Where LLM judges get their answers: an OpenAI-compatible endpoint or a local model.
#[derive(clap::Args, Debug, Clone)]
pub struct JudgeBackendArgs {
    /// OpenAI-compatible endpoint for LLM judges (e.g. http://localhost:8000/v1).
    #[arg(long)]
    pub judge_endpoint: Option<String>,
    /// Judge model name sent to the endpoint.
    #[arg(long)]
    pub judge_model: Option<String>,
    /// Environment variable holding the endpoint's API key (never logged or written).
    #[arg(long, default_value = "SAFEGEO_JUDGE_API_KEY")]
    pub judge_key_env: String,
    /// Answer LLM-judge prompts with this local model (.gguf or HF folder) instead of an endpoint.
    #[arg(long, conflicts_with = "judge_endpoint")]
    pub judge_model_path: Option<PathBuf>,
    /// Seconds before a judge request times out (then retried with backoff, 4 times).
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
    pub judge_timeout: u64,
}

impl Default for JudgeBackendArgs {
    fn default() -> Self {
        defaults()
    }
}

impl JudgeBackendArgs {
    /// Checks the endpoint before anything is generated. (Not a clap value parser: clap's error
    /// would echo the URL, credentials and all.)
    pub fn check(&self) -> Result<()> {
        if let Some(u) = &self.judge_endpoint {
            endpoint_url(u).map_err(|e| {
                anyhow::Error::from(safegeo_data::Error::Invalid(format!(
                    "--judge-endpoint: {e}\n  fix: give the OpenAI-compatible server's base URL, e.g. http://localhost:8000/v1"
                )))
            })?;
        }
        Ok(())
    }

    /// The configured backend, or `None` when neither an endpoint nor a local model is given.
    pub fn completer(
        &self,
        device_name: &str,
    ) -> Result<Option<std::sync::Arc<dyn safegeo_data::judges::llm::Completer>>> {
        use safegeo_data::judges::llm::{EndpointCompleter, EndpointConfig, LocalCompleter};
        if let Some(url) = &self.judge_endpoint {
            let cfg = EndpointConfig {
                url: url.clone(),
                model: self.judge_model.clone().unwrap_or_default(),
                api_key_env: self.judge_key_env.clone(),
                timeout: std::time::Duration::from_secs(self.judge_timeout),
                ..Default::default()
            };
            return Ok(Some(std::sync::Arc::new(EndpointCompleter::new(cfg)?)));
        }
        if let Some(p) = &self.judge_model_path {
            let dev = device(device_name)?;
            return Ok(Some(std::sync::Arc::new(LocalCompleter::new(
                safegeo_runtime::load_model(p, &dev)?,
            ))));
        }
        Ok(None)
    }

    /// How results name the backend (no secrets).
    pub fn describe(&self) -> Option<String> {
        self.judge_endpoint
            .as_ref()
            .map(|u| {
                format!(
                    "endpoint {} model {}",
                    safegeo_data::judges::llm::redact_url(u),
                    self.judge_model.clone().unwrap_or_default()
                )
            })
            .or(self
                .judge_model_path
                .as_ref()
                .map(|p| format!("local {}", p.display())))
    }
}

/// `--chat`/`--system`/`--no-template`.
#[derive(clap::Args, Debug, Clone)]
pub struct PromptArgs {
    /// The user's message (rendered with the model's chat template).
    #[arg(long)]
    pub chat: Option<String>,
    /// A system prompt; without it the template's own default (if any) is used.
    #[arg(long)]
    pub system: Option<String>,
    /// Feed the text raw, without the chat template (for base models).
    #[arg(long)]
    pub no_template: bool,
}

impl PromptArgs {
    /// Messages for a user text.
    pub fn messages(&self, user: &str) -> Vec<Message> {
        let mut m = Vec::new();
        if let Some(s) = &self.system {
            m.push(Message::new("system", s.clone()));
        }
        m.push(Message::new("user", user));
        m
    }
}

pub fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        s if s.starts_with("cuda") => {
            let idx = s
                .strip_prefix("cuda")
                .and_then(|r| r.strip_prefix(':'))
                .unwrap_or("0");
            let idx: usize = idx
                .parse()
                .with_context(|| format!("bad device `{s}` (use cuda:N)"))?;
            Device::new_cuda(idx).with_context(|| {
                format!("device `{s}` unavailable: build with `--features cuda` on a machine with a GPU")
            })
        }
        other => anyhow::bail!("unknown device `{other}`: use cpu or cuda:N"),
    }
}

/// Resolve `--model` to a path, fetching known models when needed.
pub fn model_path(spec: Option<&str>) -> Result<PathBuf> {
    let known = |m: &KnownModel| -> Result<PathBuf> {
        let p = fetch::cached_path(m);
        if !p.exists() {
            note!("fetching {} into {} ...", m.name, p.display());
        }
        Ok(fetch::ensure(m, false)?)
    };
    match spec {
        None => known(&fetch::SMOLLM2),
        Some(s) => {
            if let Some(m) = fetch::KNOWN.iter().find(|m| m.name == s) {
                return known(m);
            }
            let p = PathBuf::from(s);
            // A link that cannot be followed is there: the loader says what is wrong with it.
            if !p.exists() && std::fs::symlink_metadata(&p).is_err() {
                return Err(safegeo_runtime::Error::ModelNotFound { path: p }.into());
            }
            Ok(p)
        }
    }
}

pub fn load(args: &ModelArgs) -> Result<Model> {
    let dev = device(&args.device)?;
    let path = model_path(args.model.as_deref())?;
    let opts = safegeo_runtime::LoadOptions {
        keep_quantized: args.quantized,
    };
    Ok(safegeo_runtime::load_model_with(&path, &dev, opts)?)
}

/// Token ids of one prompt (template unless `raw`).
pub fn prompt_ids(model: &Model, prompt: &PromptArgs, messages: &[Message]) -> Result<Vec<u32>> {
    Ok(model.tok.encode_chat(messages, prompt.no_template)?)
}

/// Exit codes: 2 bad input, 3 model problems, 1 anything else.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    use safegeo_data::Error as D;
    use safegeo_geometry::Error as G;
    let data = match e.downcast_ref::<G>() {
        Some(G::Data(d)) => Some(d),
        Some(G::Runtime(r)) => return runtime_code(r),
        Some(G::Invalid(_)) => return 2,
        Some(G::Mismatch(_)) => return 1,
        Some(G::Candle(_)) => return 1,
        None => e.downcast_ref::<D>(),
    };
    match data {
        Some(D::Runtime(r)) => runtime_code(r),
        Some(
            D::MissingDataset { .. }
            | D::UnknownDataset(_)
            | D::Parse { .. }
            | D::Empty(_)
            | D::Invalid(_),
        ) => 2,
        Some(_) => 1,
        None => e
            .downcast_ref::<safegeo_runtime::Error>()
            .map_or(1, runtime_code),
    }
}

fn runtime_code(r: &safegeo_runtime::Error) -> i32 {
    use safegeo_runtime::Error as E;
    match r {
        E::ModelNotFound { .. }
        | E::ModelUnreadable { .. }
        | E::BadGguf { .. }
        | E::Checksum { .. }
        | E::UnsupportedQuant { .. }
        | E::UnknownArchitecture { .. }
        | E::MissingKey { .. }
        | E::MissingTensor { .. }
        | E::OutsideModel { .. }
        | E::ShapeMismatch { .. }
        | E::BadConfig { .. }
        | E::NonFinite { .. }
        | E::BadSafetensors { .. }
        | E::Tokenizer { .. } => 3,
        E::EmptyPrompt | E::ContextOverflow { .. } | E::Invalid(_) | E::Template(_) => 2,
        _ => 1,
    }
}

/// Print JSON to stdout.
pub fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// sha256 of a model file, or of `config.json` + weight index for a folder.
pub fn model_hash(path: &std::path::Path) -> Result<String> {
    if path.is_file() {
        return Ok(fetch::sha256_file(path)?);
    }
    let mut parts = Vec::new();
    for f in [
        "config.json",
        "model.safetensors.index.json",
        "model.safetensors",
    ] {
        let p = path.join(f);
        if p.is_file() {
            parts.push(format!("{f}:{}", fetch::sha256_file(&p)?));
        }
    }
    Ok(parts.join(";"))
}

/// Write `config.json` into a run folder, or check that an existing run used the same settings
/// (resuming into a folder made with other settings would mix results).
pub fn check_or_write_config(out: &std::path::Path, config: &serde_json::Value) -> Result<()> {
    safegeo_runtime::files::lock_dir(out)?;
    let path = out.join("config.json");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let old: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is corrupt", path.display()))?;
        if &old != config {
            anyhow::bail!(
                "{} holds a run with different settings ({})\n  fix: use a new --out folder, or delete {} to start over",
                out.display(),
                differing_settings(&old, config).join(", "),
                out.display()
            );
        }
        return Ok(());
    }
    safegeo_runtime::files::write_atomic(&path, serde_json::to_string_pretty(config)?.as_bytes())?;
    Ok(())
}

/// The settings of two runs' configurations that differ, by their key path (`train.lr`).
fn differing_settings(old: &serde_json::Value, new: &serde_json::Value) -> Vec<String> {
    fn walk(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
        match (a, b) {
            (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let null = serde_json::Value::Null;
                    let sub = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    walk(
                        &sub,
                        x.get(k).unwrap_or(&null),
                        y.get(k).unwrap_or(&null),
                        out,
                    );
                }
            }
            _ if a != b => out.push(path.to_string()),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk("", old, new, &mut out);
    if out.len() > 8 {
        let more = out.len() - 8;
        out.truncate(8);
        out.push(format!("and {more} more"));
    }
    out
}

/// A progress display: a bar on a terminal, a line per 10% otherwise (logs, CI, nohup).
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    label: String,
    len: u64,
    last_decile: u64,
    start: std::time::Instant,
    /// Shown after the count (e.g. a training step's loss and tokens/s).
    message: String,
}

impl Progress {
    /// A progress display for `label` items.
    pub fn new(label: &str) -> Self {
        use std::io::IsTerminal;
        let bar = (std::io::stderr().is_terminal() && !quiet()).then(|| {
            let style = indicatif::ProgressStyle::with_template(&format!(
                "{{bar:40}} {{pos}}/{{len}} {label} {{elapsed}} eta {{eta}} {{msg}}"
            ))
            .expect("valid template");
            indicatif::ProgressBar::new(0).with_style(style)
        });
        Self {
            bar,
            label: label.to_string(),
            len: 0,
            last_decile: 0,
            start: std::time::Instant::now(),
            message: String::new(),
        }
    }

    /// Show `message` after the count from now on.
    pub fn message(&mut self, message: String) {
        if let Some(b) = &self.bar {
            b.set_message(message.clone());
        }
        self.message = message;
    }

    /// Report `done` of `total`.
    pub fn set(&mut self, done: usize, total: usize) {
        self.len = total as u64;
        match &self.bar {
            Some(b) => {
                b.set_length(total as u64);
                b.set_position(done as u64);
            }
            None => {
                let decile = if total == 0 {
                    10
                } else {
                    10 * done as u64 / total as u64
                };
                if decile > self.last_decile && !quiet() {
                    self.last_decile = decile;
                    let elapsed = self.start.elapsed().as_secs_f64();
                    let eta = elapsed * (total - done.min(total)) as f64 / done.max(1) as f64;
                    eprintln!(
                        "{done}/{total} {} ({elapsed:.0}s, eta {eta:.0}s){}{}",
                        self.label,
                        if self.message.is_empty() { "" } else { " " },
                        self.message
                    );
                }
            }
        }
    }

    /// Clear the bar.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// A progress display for work reported in named stages, `(stage, done, total)`: a new bar (or
/// line series) each time the stage changes.
#[derive(Default)]
pub struct StagedProgress {
    current: Option<(String, Progress)>,
}

impl StagedProgress {
    /// Report `done` of `total` in `stage`.
    pub fn set(&mut self, stage: &str, done: usize, total: usize) {
        if self.current.as_ref().is_none_or(|(s, _)| s != stage) {
            self.finish();
            self.current = Some((stage.to_string(), Progress::new(stage)));
        }
        if let Some((_, bar)) = self.current.as_mut() {
            bar.set(done, total);
        }
    }

    /// Clear the current bar.
    pub fn finish(&self) {
        if let Some((_, bar)) = &self.current {
            bar.finish();
        }
    }
}

/// A bad option value, as an error that exits with code 2 (like clap's own usage errors).
macro_rules! invalid {
    ($($arg:tt)*) => {
        anyhow::Error::from(safegeo_data::Error::Invalid(format!($($arg)*)))
    };
}
pub(crate) use invalid;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differing_settings_are_named_by_their_path() {
        let old = serde_json::json!({"model": "a", "train": {"lr": 1e-4, "steps": 10}, "seed": 0});
        let new = serde_json::json!({"model": "a", "train": {"lr": 2e-4, "steps": 10}, "n": 3});
        assert_eq!(differing_settings(&old, &new), ["n", "seed", "train.lr"]);
        assert!(differing_settings(&old, &old).is_empty());
    }

    #[test]
    fn credentials_never_pass_the_endpoint_check_in_its_message() {
        let e = endpoint_url("ftp://u:secret@h/v1?api_key=k2").unwrap_err();
        assert!(!e.contains("secret") && !e.contains("k2"), "{e}");
        assert!(endpoint_url("https://h:8000/v1?x=1").is_ok());
        assert!(endpoint_url("http://:80/v1").is_err());
    }
}
