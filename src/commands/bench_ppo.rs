//! `rankpilot bench ppo`: rankpilot's PPO against Stable-Baselines3's PPO on one preset, in one
//! run. SB3 trains through rankpilot's Gymnasium environment (`benches/python/sb3_ppo.py`), with
//! its documented defaults; rankpilot trains with the `ppo` policy preset (the same learner
//! without the model-based prior, the like-for-like row) and the `default` preset (prior +
//! learned residual). Both get the same environment steps and threads; both are then evaluated
//! greedily on the same episodes (`rankpilot eval --seed <eval-seed>`), and their gap closed is
//! reported with a paired bootstrap interval. Throughput is env steps per second of training
//! wall time (learning included, as SB3 reports `fps`) and of stepping alone (random actions).

use std::time::Instant;

use anyhow::{Context, Result, bail};
use rand::{Rng, SeedableRng};

use envs::eval::{EvalRow, SuiteSummary};
use envs::{Baseline, EnvSpec, VecEnv};
use policies::model::TrainedPolicy;
use policies::trainer::Trainer;
use rankpilot_config::BadInput;

use super::bench::{BenchArgs, run_python, script};

/// Bootstrap replicates of the intervals.
const RESAMPLES: usize = 2000;

fn row(name: &str, returns: Vec<f64>) -> EvalRow {
    let n = returns.len() as f64;
    let mean = returns.iter().sum::<f64>() / n;
    let se = (returns.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0) / n).sqrt();
    EvalRow {
        name: name.into(),
        episodes: returns.len(),
        mean_return: mean,
        se_return: se,
        final_loss: f64::NAN,
        se_final_loss: f64::NAN,
        resource_used: f64::NAN,
        violation_rate: f64::NAN,
        skip_rate: f64::NAN,
        change_rate: f64::NAN,
        oracle_gap_closed: None,
        returns,
    }
}

/// Env steps per second of `VecEnv` stepping alone (random rank indices and skips), over ~2 s.
fn raw_env_sps(spec: &std::sync::Arc<EnvSpec>, n_envs: usize, seed: u64) -> Result<f64> {
    let mut env = VecEnv::from_spec(spec.clone(), n_envs, seed);
    let n = env.n_sites();
    let k = spec.rank_set.len();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let pool: Vec<(Vec<u8>, Vec<bool>)> = (0..64)
        .map(|_| {
            let idx = (0..n_envs * n).map(|_| rng.random_range(0..k) as u8).collect();
            let skip = (0..n_envs)
                .map(|_| spec.resource.kind() != envs::presets::ResourceKind::Budget && rng.random_bool(0.2))
                .collect();
            (idx, skip)
        })
        .collect();
    let t0 = Instant::now();
    let mut steps = 0u64;
    while t0.elapsed().as_secs_f64() < 2.0 {
        let (idx, skip) = &pool[(steps as usize / n_envs) % pool.len()];
        env.step_indices_skipping(idx, skip)?;
        steps += n_envs as u64;
    }
    Ok(steps as f64 / t0.elapsed().as_secs_f64())
}

/// Runs `rankpilot bench ppo` and prints its table.
pub fn run(a: &BenchArgs) -> Result<()> {
    let threads = a.threads.unwrap_or(1);
    tch::set_num_threads(threads as i32);
    if a.episodes < 2 || a.env_steps == 0 {
        bail!(BadInput("--episodes must be at least 2 and --env-steps at least 1".into()));
    }
    let preset = envs::presets::load(&a.env).map_err(|e| BadInput(format!("--env: {e}")))?;
    let spec = EnvSpec::new(&preset).map_err(|e| BadInput(format!("--env {}: {e}", a.env)))?;
    let seed = a.common.seed;
    println!(
        "bench ppo: preset `{}` ({} sites, {} ranks), {} env steps per learner, {threads} thread(s), seed {seed}; \
         evaluated greedily on {} episodes (seed {})",
        preset.name,
        spec.n_sites(),
        spec.rank_set.len(),
        a.env_steps,
        a.episodes,
        a.eval_seed
    );

    // SB3 first (its own process), so that the two never share the cores.
    eprintln!("training Stable-Baselines3 PPO ...");
    let sb3 = run_python(
        a,
        &[
            script(a, "sb3_ppo.py").display().to_string(),
            a.env.clone(),
            a.env_steps.to_string(),
            seed.to_string(),
            a.eval_seed.to_string(),
            a.episodes.to_string(),
            threads.to_string(),
            a.sb3_envs.to_string(),
        ],
    )
    .context("the Stable-Baselines3 half (benches/python/sb3_ppo.py; needs `pip install stable-baselines3`, which scripts/setup.sh does)")?;
    let floats = |k: &str| -> Result<Vec<f64>> {
        sb3[k]
            .as_array()
            .with_context(|| format!("sb3 output has no `{k}`"))?
            .iter()
            .map(|v| v.as_f64().context("a number"))
            .collect()
    };

    let mut table = envs::evaluate_baselines(&preset, &[Baseline::Uniform, Baseline::Oracle], a.episodes, a.eval_seed)?;
    // The same episodes on both sides: the oracle's returns must agree.
    let oracle_py = floats("oracle")?;
    let oracle_rs = &table.rows.iter().find(|r| r.name == "oracle").context("oracle row")?.returns;
    let agree = oracle_py.iter().zip(oracle_rs).all(|(p, r)| (p - r).abs() <= 1e-9 * r.abs().max(1.0));
    if !agree {
        bail!(
            "the Python environment's oracle returns differ from the Rust evaluation's: the two sides did not play the same episodes"
        );
    }
    let mut speeds = vec![(
        "SB3 PPO (MultiInputPolicy)".to_string(),
        sb3["train_sps"].as_f64().unwrap_or(f64::NAN),
        sb3["raw_sps"].as_f64().unwrap_or(f64::NAN),
    )];
    table.push(row("SB3 PPO (MultiInputPolicy)", floats("returns")?));

    for (label, policy) in [("rankpilot PPO (no prior)", "ppo"), ("rankpilot PPO + prior (default)", "default")] {
        eprintln!("training {label} ...");
        let pp = policies::trainer::load_preset(policy)?;
        let mut trainer = Trainer::new(&preset, &pp, a.env_steps, seed, tch::Device::Cpu)?;
        let t0 = Instant::now();
        while !trainer.finished() {
            trainer.iterate();
        }
        let secs = t0.elapsed().as_secs_f64();
        let trained = trainer.global_step;
        let mut greedy = TrainedPolicy::greedy(&trainer.model, label);
        let r = envs::evaluate(&preset, &mut greedy, a.episodes, a.eval_seed)?;
        table.push(r);
        speeds.push((label.to_string(), trained as f64 / secs, raw_env_sps(&spec, pp.ppo.num_envs, seed)?));
    }
    table.fill_gap();
    let summary =
        SuiteSummary::new(std::slice::from_ref(&table), RESAMPLES, a.eval_seed).map_err(anyhow::Error::msg)?;
    let gap = |name: &str| summary.rows.iter().position(|r| r == name).map(|i| summary.mean[i]);

    println!();
    println!("| learner | train env steps/s | env steps/s alone | gap closed [95% CI] | Δ gap vs SB3 [95% CI] |");
    println!("|---|---:|---:|---:|---:|");
    let sb3_name = speeds[0].0.clone();
    for (name, train_sps, raw_sps) in &speeds {
        let g = gap(name).map(|e| e.show()).unwrap_or_else(|| "–".into());
        let d = if *name == sb3_name {
            "–".into()
        } else {
            summary
                .mean_difference(name, &sb3_name)
                .map(|e| format!("{:+.3} [{:+.3}, {:+.3}]", e.value, e.lo, e.hi))
                .unwrap_or_default()
        };
        println!("| {name} | {train_sps:.0} | {raw_sps:.0} | {g} | {d} |");
    }
    let sb3_train = speeds[0].1;
    println!();
    for (name, train_sps, _) in &speeds[1..] {
        println!("{name}: {:.1}x SB3's training env steps/s", train_sps / sb3_train);
    }
    println!(
        "oracle {:.3}, uniform {:.3} mean return; the oracle's returns agree between the Python and Rust episodes",
        table.rows.iter().find(|r| r.name == "oracle").map_or(f64::NAN, |r| r.mean_return),
        table.rows.iter().find(|r| r.name == "uniform").map_or(f64::NAN, |r| r.mean_return),
    );
    Ok(())
}
