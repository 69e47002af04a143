//! `rankpilot eval`: baselines, the oracle and trained policies side by side.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use envs::Baseline;
use policies::model::{PolicyModel, Schema, TrainedPolicy};
use policies::trainer::CheckpointConfig;

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
    /// Evaluate on every environment of a held-out suite instead of one preset: an embedded name
    /// (default: the test suite, 12 draws of the default training distribution + every built-in
    /// preset; validation: 12 other draws; selection: 48 other draws, for choosing between
    /// variants; holdout: 96 other draws, never used to choose, for how often a shipped policy
    /// falls below its prior on unseen draws; holdout2: 96 more, written after the first was
    /// studied) or a path to a suite .toml. Prints gap closed per environment and the suite mean, each with a
    /// 95 % paired bootstrap interval, and each checkpoint's paired difference to its own prior
    /// alone and to AdaLoRA (and every later checkpoint's to the first), with the environments
    /// where it is significantly below: one by one (95 % interval) and after Holm's correction for
    /// testing every environment at once (family-wise 2.5 %, one-sided; one by one, chance alone
    /// flags about 2.5 % of the environments where two rows differ). Rows: uniform, adalora, oracle, each checkpoint and, for a
    /// checkpoint with a prior, `<label> prior` (the same preset's untrained policy, whose plans
    /// and skips are the prior's).
    #[arg(long, conflicts_with = "env")]
    pub suite: Option<String>,
    /// With --suite: also a row `<label> sampled` per checkpoint, acting with the stochastic
    /// policy PPO trains (site-by-site sampling under the budget, seeded) instead of greedily.
    #[arg(long)]
    pub sampled: bool,
    /// Environments evaluated in parallel with --suite [default: the number of cores].
    #[arg(long)]
    pub jobs: Option<usize>,
    /// Bootstrap replicates for the suite's intervals.
    #[arg(long, default_value_t = 1000)]
    pub resamples: usize,
    /// Built-in policies to evaluate, comma-separated: uniform, adalora, random, oracle
    /// [default: all four; with --suite: uniform, adalora, oracle, which the suite always has].
    #[arg(long, value_delimiter = ',')]
    pub policy: Option<Vec<String>>,
    /// A trained policy checkpoint directory to add as a row (repeatable).
    #[arg(long)]
    pub checkpoint: Vec<PathBuf>,
    /// Episodes per policy and environment (the same episodes for every row) [default: 200; with
    /// --suite: 500].
    #[arg(long)]
    pub episodes: Option<usize>,
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

/// A checkpoint loaded for evaluation, with its row label.
struct Loaded {
    label: String,
    model: PolicyModel,
    cfg: CheckpointConfig,
}

fn load_checkpoints(a: &EvalArgs) -> anyhow::Result<Vec<Loaded>> {
    let mut out: Vec<Loaded> = Vec::new();
    for dir in &a.checkpoint {
        let (meta, tensors) = checkpoint::load(dir, checkpoint::POLICY_KIND)
            .with_context(|| format!("--checkpoint {}", dir.display()))?;
        let (model, cfg) =
            policies::trainer::policy_from_checkpoint(&meta.config, &meta.state, &tensors, a.common.device)
                .map_err(|e| BadInput(format!("{}: {e}", dir.display())))?;
        // Row label: the directory name, with its parent for `<run>/best`.
        let name = |p: &std::path::Path| p.file_name().map(|n| n.to_string_lossy().to_string());
        let mut label = match name(dir).as_deref() {
            Some("best") => format!("{}/best", dir.parent().and_then(name).unwrap_or_default()),
            Some(n) => n.to_string(),
            None => "policy".into(),
        };
        if out.iter().any(|l| l.label == label) {
            label = dir.display().to_string();
        }
        out.push(Loaded { label, model, cfg });
    }
    Ok(out)
}

fn check_fits(l: &Loaded, preset: &envs::EnvPreset, spec: &envs::EnvSpec) -> Result<(), BadInput> {
    l.cfg
        .schema
        .check_compatible(&Schema::current(spec.rank_set.ranks()))
        .map_err(|e| BadInput(format!("--checkpoint {}: does not fit preset `{}`: {e}", l.label, preset.name)))
}

fn episodes(a: &EvalArgs, default: usize) -> Result<usize, BadInput> {
    let n = a.episodes.unwrap_or(default);
    if !(1..=crate::commands::train::MAX_EVAL_EPISODES).contains(&n) {
        return Err(BadInput(format!(
            "--episodes {n}: allowed: an integer from 1 to {}",
            crate::commands::train::MAX_EVAL_EPISODES
        )));
    }
    Ok(n)
}

/// Runs the command.
pub fn run(a: &EvalArgs) -> anyhow::Result<()> {
    if let Some(suite) = &a.suite {
        return run_suite(a, suite);
    }
    let preset = envs::presets::load(&a.env).map_err(|e| BadInput(e.to_string()))?;
    let episodes = episodes(a, 200)?;
    let names = a.policy.clone().unwrap_or_else(|| Baseline::ALL.iter().map(|b| b.name().to_string()).collect());
    let which = names.iter().filter(|s| !s.is_empty()).map(|s| parse_baseline(s)).collect::<Result<Vec<_>, _>>()?;
    let loaded = load_checkpoints(a)?;
    let spec = envs::EnvSpec::new(&preset)?;
    for l in &loaded {
        check_fits(l, &preset, &spec)?;
    }
    let mut table = envs::evaluate_baselines(&preset, &which, episodes, a.common.seed)?;
    for l in &loaded {
        let mut policy = TrainedPolicy::greedy(&l.model, l.label.clone());
        table.push(envs::evaluate(&preset, &mut policy, episodes, a.common.seed)?);
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

/// `eval --suite`: every environment of the suite, the gap table with intervals, the paired
/// differences that matter (each checkpoint against its prior alone and against AdaLoRA).
fn run_suite(a: &EvalArgs, name: &str) -> anyhow::Result<()> {
    let suite = envs::distribution::EnvSuite::load(name).map_err(|e| BadInput(format!("--suite: {e}")))?;
    let environments = suite.environments().map_err(|e| BadInput(format!("--suite {name}: {e}")))?;
    let episodes = episodes(a, 500)?;
    if !(10..=100_000).contains(&a.resamples) {
        return Err(BadInput(format!("--resamples {}: allowed: an integer from 10 to 100000", a.resamples)).into());
    }
    let mut which = vec![Baseline::Uniform, Baseline::Adalora, Baseline::Oracle];
    let extra = a.policy.clone().unwrap_or_default();
    for b in extra.iter().filter(|s| !s.is_empty()).map(|s| parse_baseline(s)).collect::<Result<Vec<_>, _>>()? {
        if !which.contains(&b) {
            which.push(b);
        }
    }
    // Environments are evaluated in parallel, one worker per core (at most --jobs); every worker
    // loads its own copy of the policies (libtorch tensors cannot be shared between threads)
    // and runs libtorch on one thread, so the results do not depend on the number of workers.
    let jobs = a
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .clamp(1, environments.len().max(1));
    let loaded = load_checkpoints(a)?;
    for preset in &environments {
        let spec = envs::EnvSpec::new(preset)?;
        for l in &loaded {
            check_fits(l, preset, &spec)?;
        }
    }
    let labels: Vec<String> = loaded.iter().map(|l| l.label.clone()).collect();
    drop(loaded);
    tch::set_num_threads(1);
    let bar = crate::commands::common::progress_bar(environments.len());
    let next = std::sync::atomic::AtomicUsize::new(0);
    // Per environment and checkpoint: the share of greedy rounds handed to the prior (`net.defer`).
    type Deferred = Vec<Option<f64>>;
    let results: Vec<anyhow::Result<Vec<(usize, envs::EvalTable, Deferred)>>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..jobs)
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<Vec<(usize, envs::EvalTable, Deferred)>> {
                    let loaded = load_checkpoints(a)?;
                    // Each checkpoint's prior alone: its own presets, untrained (a zero
                    // residual acts as the prior).
                    let priors: Vec<Option<PolicyModel>> = loaded
                        .iter()
                        .map(|l| {
                            let p = &l.cfg.policy_preset;
                            p.prior.enabled.then(|| {
                                PolicyModel::with_prior(
                                    a.common.device,
                                    &l.cfg.schema.ranks,
                                    p.ppo.net,
                                    policies::ddim::DdimConfig::default(),
                                    &p.prior,
                                )
                            })
                        })
                        .collect();
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let Some(preset) = environments.get(i) else { break };
                        let mut table = envs::evaluate_baselines(preset, &which, episodes, a.common.seed)?;
                        let mut deferred = Vec::new();
                        for ((l, prior), label) in loaded.iter().zip(&priors).zip(&labels) {
                            let mut policy = TrainedPolicy::greedy(&l.model, label.clone());
                            table.push(envs::evaluate(preset, &mut policy, episodes, a.common.seed)?);
                            let (rounds, handed) = policy.rounds;
                            deferred.push(l.model.defer.as_ref().map(|_| handed as f64 / rounds.max(1) as f64));
                            if a.sampled {
                                let seed = envs::derive_seed(a.common.seed, 0x5a3e);
                                let mut policy = TrainedPolicy::sampling(&l.model, format!("{label} sampled"), seed);
                                table.push(envs::evaluate(preset, &mut policy, episodes, a.common.seed)?);
                            }
                            if let Some(p) = prior {
                                let mut policy = TrainedPolicy::greedy(p, format!("{label} prior"));
                                table.push(envs::evaluate(preset, &mut policy, episodes, a.common.seed)?);
                            }
                        }
                        out.push((i, table, deferred));
                        bar.inc(1);
                    }
                    Ok(out)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|_| Err(anyhow::anyhow!("an evaluation worker panicked"))))
            .collect()
    });
    bar.finish_and_clear();
    let mut indexed = Vec::with_capacity(environments.len());
    for r in results {
        indexed.extend(r?);
    }
    indexed.sort_by_key(|(i, _, _)| *i);
    let deferred: Vec<Deferred> = indexed.iter().map(|(_, _, d)| d.clone()).collect();
    let tables: Vec<envs::EvalTable> = indexed.into_iter().map(|(_, t, _)| t).collect();
    let summary = envs::eval::SuiteSummary::new(&tables, a.resamples, a.common.seed).map_err(anyhow::Error::msg)?;
    let mut report = format!(
        "suite `{}`: {} environments, {episodes} episodes each, seed {}, {} bootstrap replicates\n",
        suite.name,
        environments.len(),
        a.common.seed,
        a.resamples
    );
    report += &summary.to_text();
    let mut md = format!(
        "suite `{}`, {} environments, {episodes} episodes each, seed {}; gap closed with 95 % paired bootstrap intervals ({} replicates)\n\n",
        suite.name,
        environments.len(),
        a.common.seed,
        a.resamples
    );
    md += &summary.to_markdown();
    md += "\n";
    // Every checkpoint against its own prior and AdaLoRA; every later one also against the first
    // (the same episodes, so the comparison of two policies is paired too).
    for (i, label) in labels.iter().enumerate() {
        let first = (i > 0).then(|| labels[0].clone());
        for base in [format!("{label} prior"), "adalora".to_string()].into_iter().chain(first) {
            let Some(d) = summary.mean_difference(label, &base) else { continue };
            let below: Vec<&str> = (0..environments.len())
                .filter(|&e| summary.difference(label, &base, e).is_some_and(|d| d.hi < 0.0))
                .map(|e| summary.environments[e].as_str())
                .collect();
            // One by one at 95 %, chance alone flags about 2.5 % of the environments where two
            // rows differ; Holm's correction says which of them hold for the suite as a whole.
            let holm: Vec<&str> = summary
                .below_after_holm(label, &base, 0.025)
                .unwrap_or_default()
                .into_iter()
                .map(|e| summary.environments[e].as_str())
                .collect();
            let named = |v: &[&str]| if v.is_empty() { String::new() } else { format!(" ({})", v.join(", ")) };
            let line = format!(
                "{label} − {base}: mean gap {:+.3} ± {:.3} (paired SE; {:.1} SE), 95% [{:+.3}, {:+.3}]; significantly below on {} of {} environments{}; after Holm's correction for the {} tests: {}{}\n",
                d.value,
                d.se,
                d.value / d.se.max(1e-12),
                d.lo,
                d.hi,
                below.len(),
                environments.len(),
                named(&below),
                environments.len(),
                holm.len(),
                named(&holm),
            );
            report += &line;
            md += &format!("- {line}");
        }
    }
    // What a defer head did: the share of greedy rounds each environment handed to the prior.
    for (c, label) in labels.iter().enumerate() {
        let shares: Vec<String> = deferred
            .iter()
            .zip(&summary.environments)
            .filter_map(|(d, env)| d.get(c).copied().flatten().map(|x| format!("{env} {x:.2}")))
            .collect();
        if !shares.is_empty() {
            let line = format!("{label}: share of rounds handed to its prior (net.defer): {}\n", shares.join(", "));
            report += &line;
            md += &format!("- {line}");
        }
    }
    print!("{report}");
    if let Some(p) = &a.json {
        let v = serde_json::json!({ "suite": suite, "episodes": episodes, "seed": a.common.seed, "summary": summary, "tables": tables });
        checkpoint::atomic_write(p, serde_json::to_string_pretty(&v)?.as_bytes())?;
    }
    if let Some(p) = &a.markdown {
        checkpoint::atomic_write(p, md.as_bytes())?;
    }
    Ok(())
}
