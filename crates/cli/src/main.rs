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
#[command(
    name = "safegeo",
    version,
    long_version = env!("SAFEGEO_LONG_VERSION"),
    about,
    long_about,
    propagate_version = true
)]
struct Cli {
    /// More logging (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// No progress or info messages; errors and warnings still print.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// Cache of models, self-distilled replies and judge answers [default: ~/.cache/safegeo].
    #[arg(
        long,
        global = true,
        env = "SAFEGEO_HOME",
        value_name = "DIR",
        help_heading = "Global options"
    )]
    home: Option<std::path::PathBuf>,
    /// The system OpenBLAS for large products: `off`, or a library file [default: used where
    /// it is faster than the built-in gemm].
    #[arg(
        long,
        global = true,
        env = "SAFEGEO_BLAS",
        value_name = "off|FILE",
        help_heading = "Global options"
    )]
    blas: Option<String>,
    /// Freed memory kept for reuse, in MiB; 0 turns the cache off (for machines short of
    /// memory) [default: a sixth of RAM, at most 4096].
    #[arg(
        long,
        global = true,
        env = "SAFEGEO_BLOCK_CACHE_MB",
        value_name = "MIB",
        help_heading = "Global options"
    )]
    block_cache_mb: Option<String>,
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
    Carriers(cmd::geometry::carriers::CarriersArgs),
    /// Select the admissible refusal carrier (bypass, induce, KL) from a carriers folder.
    Select(cmd::geometry::select::SelectArgs),
    /// Drift between two anchors' carriers: principal angles, cosines, layer shift.
    Drift(cmd::geometry::drift::DriftArgs),
    /// Causal sweeps of the refusal and harmfulness carriers against matched random controls.
    Sweep(cmd::geometry::sweep::SweepArgs),
    /// Write a copy of the model with a carrier orthogonalized out of its weights (HF folder).
    Abliterate(cmd::geometry::abliterate::AbliterateArgs),
    /// A carrier as a llama.cpp control vector (GGUF), to steer with in llama.cpp.
    ControlVector(cmd::geometry::control_vector::ControlVectorArgs),
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
    /// Print a shell completion script (e.g. `safegeo completions bash > ~/.local/share/bash-completion/completions/safegeo`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page, or write one page per command into a folder.
    Man {
        /// Write safegeo.1 and safegeo-COMMAND.1 here instead of printing safegeo.1.
        #[arg(long, value_name = "DIR")]
        out: Option<std::path::PathBuf>,
    },
}

/// The settings read from the environment by the libraries, given on the command line instead.
fn export_global_options(cli: &Cli) {
    // Single-threaded still: nothing else reads the environment yet.
    if let Some(h) = &cli.home {
        std::env::set_var("SAFEGEO_HOME", h);
    }
    if let Some(b) = &cli.blas {
        std::env::set_var("SAFEGEO_BLAS", b);
    }
    if let Some(mb) = &cli.block_cache_mb {
        std::env::set_var("SAFEGEO_BLOCK_CACHE_MB", mb);
    }
}

/// `safegeo man`: roff pages rendered from the same definitions as `--help`.
fn man(out: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    use clap::CommandFactory;
    let cmd = Cli::command();
    let Some(dir) = out else {
        clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?;
        return Ok(());
    };
    std::fs::create_dir_all(&dir)?;
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
    safegeo_runtime::files::write_atomic(&dir.join("safegeo.1"), &page)?;
    for sub in cmd.get_subcommands() {
        let name = format!("safegeo-{}", sub.get_name());
        let mut page = Vec::new();
        clap_mangen::Man::new(sub.clone().name(name.clone())).render(&mut page)?;
        safegeo_runtime::files::write_atomic(&dir.join(format!("{name}.1")), &page)?;
    }
    common::note!(
        "wrote {} man pages into {}",
        cmd.get_subcommands().count() + 1,
        dir.display()
    );
    Ok(())
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
    // candle attaches a captured backtrace to its errors whenever RUST_BACKTRACE is set; user
    // messages carry none (panics still print theirs). RUST_LIB_BACKTRACE=1 brings them back.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    // Without RAYON_NUM_THREADS, candle counts physical cores by parsing /proc/cpuinfo on every
    // matmul (num_cpus), a visible share of batch-1 decoding. Pin its own answer once.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    let cli = Cli::parse();
    export_global_options(&cli);
    common::set_quiet(cli.quiet);
    if let Err(e) = safegeo_runtime::block_cache::configure_from_env() {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    // candle's pool worker spins 25,000 times before it parks; with as many threads as cores
    // that spin takes a core from gemm's threads, so 200 is faster for everything but decoding
    // with quantized weights: there ~200 small matmuls a token run on that pool, and a parked
    // worker wakes too late for each (docs/architecture.md, Threads). Set before candle starts
    // its pool; the user's value wins.
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
        _ if cli.quiet => "error",
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
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
        Command::Carriers(a) => cmd::geometry::carriers::run(a),
        Command::Select(a) => cmd::geometry::select::run(a),
        Command::Drift(a) => cmd::geometry::drift::run(a),
        Command::Abliterate(a) => cmd::geometry::abliterate::run(a),
        Command::ControlVector(a) => cmd::geometry::control_vector::run(a),
        Command::Sweep(a) => cmd::geometry::sweep::run(a),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "safegeo",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Man { out } => man(out),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(common::exit_code(&e));
    }
}
