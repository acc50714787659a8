//! `safegeo`: measure and change how language models refuse.
mod cmd;
mod common;

use clap::{Parser, Subcommand};

// Bounds the memory of untrusted chat templates (minijinja has no memory limit of its own).
#[global_allocator]
static ALLOC: safegeo_runtime::alloc_guard::Guarded = safegeo_runtime::alloc_guard::Guarded;

/// safegeo: measure and change how a language model refuses: evaluate its behaviour, attack it,
/// safety-train it, find its refusal carriers, test them causally, edit them out, and follow how
/// they move along a training run.
///
/// Every command that takes --model uses the embedded default (SmolLM2-135M-Instruct, Q4_1 GGUF)
/// when it is omitted, fetching it into the cache ($SAFEGEO_HOME, default ~/.cache/safegeo) the
/// first time. --model also takes a .gguf file, a Hugging Face folder (config.json,
/// *.safetensors, tokenizer.json) or a known model name (see `safegeo model list`).
#[derive(Parser)]
#[command(name = "safegeo", version, about, long_about, propagate_version = true)]
struct Cli {
    /// More logging (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per run; boxing buys nothing
enum Command {
    /// Fetch, list and inspect models.
    #[command(subcommand)]
    Model(cmd::model::ModelCmd),
    /// One forward pass: top logits and residual norms at the last prompt token.
    Forward(cmd::forward::ForwardArgs),
    /// Generate replies for one prompt or a JSONL file of prompts.
    Generate(cmd::generate::GenerateArgs),
    /// Behaviour evaluation: generate on benchmark suites, judge, summarise with intervals.
    Eval(cmd::eval::EvalArgs),
    /// Refusal and harmfulness carrier candidates from harmful vs harmless prompts.
    Carriers(cmd::geometry::CarriersArgs),
    /// Select the admissible refusal carrier (bypass, induce, KL) from a carriers folder.
    Select(cmd::geometry::SelectArgs),
    /// Drift between two anchors' carriers: principal angles, cosines, layer shift.
    Drift(cmd::geometry::DriftArgs),
    /// Causal sweeps of the refusal and harmfulness carriers against matched random controls.
    Sweep(cmd::geometry::SweepArgs),
    /// Write a copy of the model with a carrier orthogonalized out of its weights (HF folder).
    Abliterate(cmd::geometry::AbliterateArgs),
    /// Adversarial test cases: prefill, random/worst insertion, GCG, AutoDAN.
    Attack(cmd::attack::AttackArgs),
    /// Safety-train a model (SFT, R2D2, worst-insertion, harmful-prefix, DeRTa) into anchor checkpoints.
    Train(cmd::train::TrainArgs),
    /// Set a safety-trained checkpoint's operating point on validation prompts (interpolation
    /// toward the base model).
    Calibrate(cmd::calibrate::CalibrateArgs),
    /// The main job on the default model: SFT and R2D2 trajectories, their measurements, the report.
    Demo(cmd::demo::DemoArgs),
    /// Behaviour and geometry at every anchor of training runs: the trajectory table and report.
    Trajectory(cmd::trajectory::TrajectoryArgs),
    /// Reason-based deception in multi-turn role-play: polite refusal vs explicit rebuttal.
    Deception(cmd::deception::DeceptionArgs),
    /// Measure this machine and the runtime: sgemm peak, capture prefill, decode, backward.
    Bench(cmd::bench::BenchArgs),
}

fn main() {
    // Rust ignores SIGPIPE, so printing into a closed pipe (`safegeo forward --json | head`)
    // panicked in println!. With the default action the process ends quietly, as other Unix
    // tools do; sockets are unaffected (std sends with MSG_NOSIGNAL).
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to its default before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // Without RAYON_NUM_THREADS, candle counts physical cores by parsing /proc/cpuinfo on every
    // matmul (num_cpus): 3.5% of batch-1 decoding in a profile. Pin its own answer once.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    if let Err(e) = safegeo_runtime::block_cache::configure_from_env() {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    let cli = Cli::parse();
    // candle's pool worker spins 25,000 times before it parks; with as many threads as cores
    // that spin takes a core from gemm's threads, and 200 made `select` 1.18x faster on 2 cores
    // (README, Performance). Decoding with quantized weights at batch 1 is the opposite case:
    // ~200 small matmuls a token on that pool, and a parked worker wakes too late for each
    // (measured: 42-52 tok/s at 200, 57-73 at 25,000). Set before candle starts its pool; the
    // user's value wins.
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        let quantized_decoding = match &cli.command {
            Command::Generate(a) => a.model.quantized,
            Command::Eval(a) => a.model.quantized,
            Command::Deception(a) => a.model.quantized,
            Command::Bench(a) => a.decodes_quantized_only(),
            _ => false,
        };
        let spins = if quantized_decoding { "25000" } else { "200" };
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", spins);
        // Tells a child `safegeo` (bench) that the value is ours to choose again, not the user's.
        std::env::set_var(cmd::bench::SPIN_LIMIT_DEFAULTED, "1");
    }
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Model(c) => cmd::model::run(c),
        Command::Forward(a) => cmd::forward::run(a),
        Command::Generate(a) => cmd::generate::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Attack(a) => cmd::attack::run(a),
        Command::Train(a) => cmd::train::run(a),
        Command::Calibrate(a) => cmd::calibrate::run(a),
        Command::Eval(a) => cmd::eval::run(a),
        Command::Deception(a) => cmd::deception::run(a),
        Command::Trajectory(a) => cmd::trajectory::run(a),
        Command::Demo(a) => cmd::demo::run(a),
        Command::Carriers(a) => cmd::geometry::carriers(a),
        Command::Select(a) => cmd::geometry::run_select(a),
        Command::Drift(a) => cmd::geometry::drift(a),
        Command::Abliterate(a) => cmd::geometry::abliterate(a),
        Command::Sweep(a) => cmd::geometry::run_sweep(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(common::exit_code(&e));
    }
}
