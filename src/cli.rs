//! Command-line interface: argument definitions and dispatch to the library.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 bad input (usage, preset, or checkpoint that
//! does not fit). Errors are printed as one `error:` line with their causes; never a panic.

use clap::{Args, Parser, Subcommand};

use crate::{commands, device};

/// rankpilot — RL rank allocation for LoRA fine-tuning.
///
/// A policy (PPO, optionally refined by DDIM) picks a LoRA rank for every adapted projection
/// from per-layer sensitivities and the state of a resource (wireless channel, latency budget,
/// parameter budget). Logs go to TensorBoard event files (`--logdir`).
#[derive(Debug, Parser)]
#[command(name = "rankpilot", version, about, long_about, max_term_width = 100)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// One variant per subcommand; each lives in its own module under `commands/`.
#[derive(Debug, Subcommand)]
enum Command {
    /// Report the installation: versions, libtorch location, CUDA devices, the chosen device.
    Doctor(commands::doctor::DoctorArgs),
    /// Train a rank policy (PPO, optionally + DDIM) in a simulated environment.
    Train(commands::train::TrainArgs),
    /// Evaluate baselines, the oracle and trained policies on an environment preset.
    Eval(commands::eval::EvalArgs),
    /// A trained policy's rank plans for observations read from a JSON Lines file.
    Act(commands::act::ActArgs),
    /// Pre-train a tiny Llama base model on local text (written in the Hugging Face layout).
    Pretrain(commands::pretrain::PretrainArgs),
    /// Dynamic-rank LoRA fine-tuning of a Hugging Face-layout Llama model; PEFT adapter export.
    Finetune(Box<commands::finetune::FinetuneArgs>),
    /// Measure a model's sites with a short high-rank probe run and write an environment preset.
    Calibrate(commands::calibrate::CalibrateArgs),
    /// Run the same fine-tuning under several rank schedulers at an equal budget; tables in MD + JSON.
    // A later flag overrides an earlier one: `--jobs` workers rerun their parent's arguments
    // with their own seed appended.
    #[command(args_override_self = true)]
    Compare(commands::compare::CompareArgs),
    /// Loss and perplexity of a model (with an optional PEFT adapter) on text.
    Evaluate(commands::evaluate::EvaluateArgs),
    /// Generate text from a prompt with a model (and adapter): greedy or temperature/top-p.
    Generate(commands::evaluate::GenerateArgs),
    /// Compress an existing PEFT LoRA adapter per site (QR-core SVD) to a rank or energy share.
    Squeeze(commands::squeeze::SqueezeArgs),
    /// Benchmarks: `svd`, `finetune` (side by side with Python torch), `policy` (decision latency).
    Bench(commands::bench::BenchArgs),
}

/// Options shared by every command that computes.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// Random seed; the same seed gives the same results on the CPU.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Compute device: auto (CUDA when available, else CPU), cpu, cuda, or cuda:N.
    #[arg(long, default_value = "auto", value_parser = device::parse_device)]
    pub device: tch::Device,
}

/// Parses the process arguments, runs the command, prints any error, returns the exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    match run(cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            exit_code(&e)
        }
    }
}

/// Exit code for an error: 2 for bad input anywhere in its chain (including a checkpoint that is
/// missing, corrupt, of another kind or version: the user pointed at it), else 1.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    let bad_input = e.chain().any(|c| {
        c.is::<rankpilot_config::BadInput>()
            || c.is::<rankpilot_config::ConfigError>()
            || c.downcast_ref::<policies::PolicyError>().is_some_and(policies::PolicyError::is_bad_input)
            || matches!(
                c.downcast_ref::<runio::checkpoint::CheckpointError>(),
                Some(
                    runio::checkpoint::CheckpointError::WrongKind { .. }
                        | runio::checkpoint::CheckpointError::WrongVersion { .. }
                        | runio::checkpoint::CheckpointError::Missing { .. }
                        | runio::checkpoint::CheckpointError::Corrupt { .. }
                )
            )
    });
    if bad_input { 2 } else { 1 }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Doctor(a) => commands::doctor::run(&a),
        Command::Train(a) => commands::train::run(&a),
        Command::Eval(a) => commands::eval::run(&a),
        Command::Act(a) => commands::act::run(&a),
        Command::Pretrain(a) => commands::pretrain::run(&a),
        Command::Finetune(a) => commands::finetune::run(&a),
        Command::Squeeze(a) => commands::squeeze::run(&a),
        Command::Evaluate(a) => commands::evaluate::run(&a),
        Command::Generate(a) => commands::evaluate::run_generate(&a),
        Command::Calibrate(a) => commands::calibrate::run(&a),
        Command::Compare(a) => commands::compare::run(&a),
        Command::Bench(a) => commands::bench::run(&a),
    }
}
