//! `rankpilot act`: a trained policy's decisions for observations read from a file, one per
//! line (the same greedy decision as `eval` and the `policy:` scheduler). It lets any other
//! program, in any language, ask a checkpoint for plans; the Python package's `Policy.act` is
//! tested against it.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde_json::{Map, Value};

use envs::observation::{GLOBAL_NAMES, SITE_NAMES};
use envs::{EnvSpec, Observation};
use policies::belief::Belief;
use policies::model::{ActMode, BudgetContext, ObsBatch};
use rankpilot_config::BadInput;
use runio::checkpoint;

use crate::cli::Common;

/// Arguments of `rankpilot act`.
#[derive(Debug, Args)]
pub struct ActArgs {
    /// A policy checkpoint directory written by `rankpilot train`.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The environment preset the observations come from (its sites' sizes, unit costs and
    /// price λ complete the round's context): an embedded name or a .toml path.
    #[arg(long, default_value = "wireless-rayleigh")]
    pub env: String,
    /// JSON Lines file, one observation per line, in episode order:
    /// `{"global": {<name>: value, …}, "sites": [{<name>: value, …}, …], "conservative_budget": x}`
    /// with every feature named as in `envs::observation` (`"new_episode": true` forgets the
    /// history; the first line starts an episode).
    #[arg(long)]
    pub observations: PathBuf,
    /// Write the plans here (JSON Lines: `{"ranks": […]}` or `{"skip": true}`) [default: stdout].
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub common: Common,
}

/// Reads the features `names` from `row` (an object keyed by name) into `out`.
fn read_row(row: &Value, names: &[&str], out: &mut [f32], what: &str) -> Result<(), String> {
    let obj = row.as_object().ok_or_else(|| format!("{what}: allowed: an object keyed by feature name"))?;
    if let Some(k) = obj.keys().find(|k| !names.contains(&k.as_str())) {
        return Err(format!("{what}: unknown feature `{k}`; allowed: {}", names.join(", ")));
    }
    for (i, n) in names.iter().enumerate() {
        let v = obj.get(*n).ok_or_else(|| format!("{what}: missing feature `{n}`"))?;
        let x = v
            .as_f64()
            .filter(|x| x.is_finite())
            .ok_or_else(|| format!("{what}.{n} = {v}: allowed: a finite number"))?;
        out[i] = x as f32;
    }
    Ok(())
}

fn parse_line(line: &str, n_sites: usize) -> Result<(Observation, f64, bool), String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let obj: &Map<String, Value> = v.as_object().ok_or("allowed: a JSON object")?;
    const KEYS: [&str; 4] = ["global", "sites", "conservative_budget", "new_episode"];
    if let Some(k) = obj.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(format!("unknown key `{k}`; allowed: {}", KEYS.join(", ")));
    }
    let mut obs = Observation::zeros(n_sites);
    read_row(obj.get("global").ok_or("missing key `global`")?, &GLOBAL_NAMES, &mut obs.global, "global")?;
    let sites = obj.get("sites").and_then(Value::as_array).ok_or("key `sites`: allowed: a list of objects")?;
    if sites.len() != n_sites {
        return Err(format!("key `sites`: {} rows; allowed: one per site of the preset ({n_sites})", sites.len()));
    }
    for (l, row) in sites.iter().enumerate() {
        read_row(row, &SITE_NAMES, obs.site_mut(l), &format!("sites[{l}]"))?;
    }
    let budget = obj
        .get("conservative_budget")
        .and_then(Value::as_f64)
        .filter(|b| b.is_finite() && *b >= 0.0)
        .ok_or("key `conservative_budget`: allowed: a finite number >= 0")?;
    let new_episode = obj.get("new_episode").map(|v| v.as_bool().ok_or("key `new_episode`: allowed: true or false"));
    Ok((obs, budget, new_episode.transpose()?.unwrap_or(false)))
}

/// Runs `rankpilot act`.
pub fn run(a: &ActArgs) -> anyhow::Result<()> {
    let (meta, tensors) = checkpoint::load(&a.checkpoint, checkpoint::POLICY_KIND)
        .with_context(|| format!("--checkpoint {}", a.checkpoint.display()))?;
    let (model, _) = policies::trainer::policy_from_checkpoint(&meta.config, &meta.state, &tensors, a.common.device)
        .map_err(|e| BadInput(format!("{}: {e}", a.checkpoint.display())))?;
    let preset = envs::presets::load(&a.env).map_err(|e| BadInput(format!("--env: {e}")))?;
    let spec = EnvSpec::new(&preset).map_err(|e| BadInput(format!("--env {}: {e}", a.env)))?;
    if spec.rank_set.ranks() != model.ranks.as_slice() {
        anyhow::bail!(BadInput(format!(
            "--checkpoint {} chooses from ranks {:?}; --env {} has the rank set {:?}",
            a.checkpoint.display(),
            model.ranks,
            a.env,
            spec.rank_set.ranks()
        )));
    }
    let file = std::fs::File::open(&a.observations)
        .map_err(|e| BadInput(format!("--observations {}: {e}", a.observations.display())))?;
    let dims: Vec<u32> = spec.sites.iter().map(|s| s.max_rank()).collect();
    let mut belief = Belief::new();
    let mut plans = String::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| BadInput(format!("--observations {}: {e}", a.observations.display())))?;
        if line.trim().is_empty() {
            continue;
        }
        let (obs, budget, new_episode) = parse_line(&line, spec.n_sites())
            .map_err(|e| BadInput(format!("--observations {} line {}: {e}", a.observations.display(), i + 1)))?;
        if new_episode {
            belief = Belief::new();
        }
        let d = model.act(
            ObsBatch::one(&obs),
            BudgetContext {
                unit_cost: &spec.unit_cost,
                budgets: &[budget],
                dims: Some(&dims),
                cost_coef: Some(spec.preset.reward.cost_coef),
            },
            std::slice::from_mut(&mut belief),
            ActMode::Greedy,
        );
        let out = if d.skip[0] {
            serde_json::json!({ "skip": true })
        } else {
            let ranks: Vec<u32> = d.executed.iter().map(|&j| model.ranks[j as usize]).collect();
            serde_json::json!({ "ranks": ranks })
        };
        plans += &out.to_string();
        plans.push('\n');
    }
    match &a.out {
        Some(p) => {
            runio::checkpoint::atomic_write(p, plans.as_bytes()).with_context(|| format!("--out {}", p.display()))?
        }
        None => std::io::stdout().write_all(plans.as_bytes())?,
    }
    Ok(())
}
