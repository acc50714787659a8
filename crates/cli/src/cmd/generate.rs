//! `safegeo generate`: replies for one prompt or a JSONL batch.
use crate::common::{self, ModelArgs, PromptArgs};
use anyhow::{bail, Context, Result};
use safegeo_runtime::{generate, generate_seeded, GenerateConfig, Message, Model, NoHooks};
use std::io::BufRead;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub prompt: PromptArgs,
    /// JSONL input, one object per line with `chat` (a string) or `messages` ([{role, content}]).
    #[arg(long, requires = "output", conflicts_with = "chat")]
    pub input: Option<PathBuf>,
    /// JSONL output: each input object plus `response` and `response_ids`. Never the input; an
    /// existing file only with --force.
    #[arg(long, requires = "input")]
    pub output: Option<PathBuf>,
    /// Replace an existing --output file.
    #[arg(long, requires = "output")]
    pub force: bool,
    /// Maximum new tokens per reply.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(value_parser = crate::common::finite, long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling mass.
    #[arg(value_parser = crate::common::finite, long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Seed for sampling (prompt i of the input uses seed + i).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Force every reply to begin with this text (prefill).
    #[arg(long)]
    pub prefill: Option<String>,
    /// Prompts decoded together.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

fn config(a: &GenerateArgs, model: &Model) -> Result<GenerateConfig> {
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let prefix_ids = match &a.prefill {
        Some(p) => model.tok.encode(p, false)?,
        None => Vec::new(),
    };
    Ok(GenerateConfig {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        prefix_ids,
    })
}

fn messages_of(v: &serde_json::Value, a: &GenerateArgs, line: usize) -> Result<Vec<Message>> {
    if let Some(c) = v.get("chat").and_then(|c| c.as_str()) {
        return Ok(a.prompt.messages(c));
    }
    if let Some(m) = v.get("messages") {
        return serde_json::from_value(m.clone()).with_context(|| {
            format!("line {line}: `messages` must be [{{\"role\", \"content\"}}]")
        });
    }
    bail!("line {line}: needs a `chat` string or a `messages` list")
}

/// Refuses an --output that would lose work or data, before anything is generated: the input
/// itself, an existing file without --force, or a folder that does not exist.
fn check_output(input: &std::path::Path, output: &std::path::Path, force: bool) -> Result<()> {
    let same = |a: &std::path::Path, b: &std::path::Path| match (a.canonicalize(), b.canonicalize())
    {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same(input, output) {
        return Err(common::invalid!(
            "--output {} is the input file\n  fix: write the replies to another file",
            output.display()
        ));
    }
    if output.is_dir() {
        return Err(common::invalid!(
            "--output {} is a folder\n  fix: name a file, e.g. {}",
            output.display(),
            output.join("replies.jsonl").display()
        ));
    }
    if output.exists() && !force {
        return Err(common::invalid!(
            "--output {} exists\n  fix: name another file, or add --force to replace it",
            output.display()
        ));
    }
    let parent = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    if !parent.is_dir() {
        return Err(common::invalid!(
            "--output {}: the folder {} does not exist\n  fix: create it first, or write elsewhere",
            output.display(),
            parent.display()
        ));
    }
    Ok(())
}

pub fn run(a: GenerateArgs) -> Result<()> {
    if let (Some(input), Some(output)) = (&a.input, &a.output) {
        check_output(input, output, a.force)?;
    }
    let model = common::load(&a.model)?;
    let cfg = config(&a, &model)?;
    if let (Some(input), Some(output)) = (&a.input, &a.output) {
        return run_file(&a, &model, &cfg, input, output);
    }
    let user = a
        .prompt
        .chat
        .clone()
        .context("give --chat TEXT, or --input FILE --output FILE")?;
    let ids = common::prompt_ids(&model, &a.prompt, &a.prompt.messages(&user))?;
    let out = generate(&model, std::slice::from_ref(&ids), &cfg, &mut NoHooks)?.remove(0);
    let text = model.tok.decode(&out.ids, true)?;
    if a.json {
        common::print_json(&serde_json::json!({
            "prompt_ids": ids, "response": text, "response_ids": out.ids, "stop": out.stop,
        }))?;
    } else {
        println!("{text}");
    }
    Ok(())
}

fn run_file(
    a: &GenerateArgs,
    model: &Model,
    cfg: &GenerateConfig,
    input: &std::path::Path,
    output: &std::path::Path,
) -> Result<()> {
    let f = std::fs::File::open(input)
        .with_context(|| format!("cannot open --input {}", input.display()))?;
    let mut rows = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("{} line {}: not JSON", input.display(), i + 1))?;
        let msgs = messages_of(&v, a, i + 1)?;
        let ids = model.tok.encode_chat(&msgs, a.prompt.no_template)?;
        rows.push((v, ids));
    }
    if rows.is_empty() {
        bail!("{} holds no prompts", input.display());
    }
    // Decode similar lengths together (less padding); write in input order.
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|&i| rows[i].1.len());
    let mut bar = common::Progress::new("prompts");
    let mut done = 0;
    let mut replies = vec![None; rows.len()];
    let t0 = std::time::Instant::now();
    let mut new_tokens = 0usize;
    for chunk in order.chunks(a.batch_size) {
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|&i| rows[i].1.clone()).collect();
        let seeds: Vec<u64> = chunk
            .iter()
            .map(|&i| cfg.seed.wrapping_add(i as u64))
            .collect();
        let outs = generate_seeded(model, &prompts, &seeds, cfg, &mut NoHooks)?;
        for (&i, o) in chunk.iter().zip(outs) {
            new_tokens += o.ids.len();
            replies[i] = Some(o);
        }
        done += chunk.len();
        bar.set(done, rows.len());
    }
    bar.finish();
    let mut text = String::new();
    for ((mut v, _), r) in rows.into_iter().zip(replies) {
        let r = r.expect("every row decoded");
        v["response"] = serde_json::Value::String(model.tok.decode(&r.ids, true)?);
        v["response_ids"] = serde_json::to_value(&r.ids)?;
        text.push_str(&serde_json::to_string(&v)?);
        text.push('\n');
    }
    safegeo_runtime::files::write_atomic(output, text.as_bytes())?;
    let secs = t0.elapsed().as_secs_f64();
    crate::common::note!(
        "wrote {} ({} new tokens in {:.1}s, {:.1} tok/s)",
        output.display(),
        new_tokens,
        secs,
        new_tokens as f64 / secs
    );
    Ok(())
}
