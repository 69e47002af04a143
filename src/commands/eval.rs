//! `rankpilot eval`: baselines, the oracle and trained policies side by side.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use envs::Baseline;
use policies::model::{Schema, TrainedPolicy};

use rankpilot_config::BadInput;
use runio::checkpoint;

use crate::cli::Common;

/// Arguments of `rankpilot eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Environment preset: an embedded name (wireless-rayleigh, wireless-rician, latency, budget,
    /// llama7b) or a path to a .toml file.
    #[arg(long, default_value = "wireless-rayleigh")]
    pub env: String,
    /// Built-in policies to evaluate, comma-separated: uniform, adalora, random, oracle.
    #[arg(long, value_delimiter = ',', default_value = "uniform,adalora,random,oracle")]
    pub policy: Vec<String>,
    /// A trained policy checkpoint directory to add as a row (repeatable).
    #[arg(long)]
    pub checkpoint: Vec<PathBuf>,
    /// Episodes per policy (the same episodes for every row).
    #[arg(long, default_value_t = 200)]
    pub episodes: usize,
    /// Also write the table as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Also write the table as Markdown to this file.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    #[command(flatten)]
    pub common: Common,
}

/// Parses a built-in policy name.
pub fn parse_baseline(name: &str) -> Result<Baseline, BadInput> {
    Baseline::ALL.into_iter().find(|b| b.name() == name).ok_or_else(|| {
        let allowed: Vec<&str> = Baseline::ALL.iter().map(|b| b.name()).collect();
        BadInput(format!("--policy: unknown policy `{name}`; allowed: {}", allowed.join(", ")))
    })
}

/// Runs the command.
pub fn run(a: &EvalArgs) -> anyhow::Result<()> {
    let preset = envs::presets::load(&a.env).map_err(|e| BadInput(e.to_string()))?;
    if !(1..=crate::commands::train::MAX_EVAL_EPISODES).contains(&a.episodes) {
        return Err(BadInput(format!(
            "--episodes {}: allowed: an integer from 1 to {}",
            a.episodes,
            crate::commands::train::MAX_EVAL_EPISODES
        ))
        .into());
    }
    let which = a.policy.iter().filter(|s| !s.is_empty()).map(|s| parse_baseline(s)).collect::<Result<Vec<_>, _>>()?;
    let mut table = envs::evaluate_baselines(&preset, &which, a.episodes, a.common.seed)?;
    let spec = envs::EnvSpec::new(&preset)?;
    for dir in &a.checkpoint {
        let (meta, tensors) = checkpoint::load(dir, checkpoint::POLICY_KIND)
            .with_context(|| format!("--checkpoint {}", dir.display()))?;
        let (model, cfg) =
            policies::trainer::policy_from_checkpoint(&meta.config, &meta.state, &tensors, a.common.device)
                .map_err(|e| BadInput(format!("{}: {e}", dir.display())))?;
        cfg.schema
            .check_compatible(&Schema::current(spec.rank_set.ranks()))
            .map_err(|e| BadInput(format!("{}: does not fit preset `{}`: {e}", dir.display(), preset.name)))?;
        // Row label: the directory name, with its parent for `<run>/best`.
        let name = |p: &std::path::Path| p.file_name().map(|n| n.to_string_lossy().to_string());
        let label = match name(dir).as_deref() {
            Some("best") => format!("{}/best", dir.parent().and_then(name).unwrap_or_default()),
            Some(n) => n.to_string(),
            None => "policy".into(),
        };
        let mut policy = TrainedPolicy { model: &model, label };
        table.push(envs::evaluate(&preset, &mut policy, a.episodes, a.common.seed)?);
    }
    print!("{}", table.to_text());
    // Paired differences (same episodes for every row) of each trained policy against the baselines.
    let trained: Vec<String> = table.rows.iter().skip(which.len()).map(|r| r.name.clone()).collect();
    for name in &trained {
        for base in ["adalora", "uniform"] {
            if let Some((d, se)) = table.paired_difference(name, base) {
                println!(
                    "{name} − {base}: {d:+.3} ± {se:.3} return (paired, {:.1} standard errors)",
                    d / se.max(1e-12)
                );
            }
        }
    }
    if let Some(p) = &a.json {
        checkpoint::atomic_write(p, table.to_json().as_bytes())?;
    }
    if let Some(p) = &a.markdown {
        checkpoint::atomic_write(p, table.to_markdown().as_bytes())?;
    }
    Ok(())
}
