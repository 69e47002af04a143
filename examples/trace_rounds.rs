//! Round-by-round trace of one episode of a suite environment: mean rank, the plan's cost
//! against the conservative budget, and skips, for a checkpoint (greedy) beside the oracle
//! and uniform. A diagnostic for what a policy does with a budget.
//!
//! The prior alone (the checkpoint's preset, untrained) is traced too when the checkpoint has one,
//! and the last lines give each policy's mean return and skipped rounds over `TRACE_EPISODES`
//! episodes (default 50; episode seeds `episode-seed`, `episode-seed + 1`, ...).
//!
//! `cargo run --release --example trace_rounds -- <checkpoint> <suite-env> [episode-seed] [suite]`
use envs::{Observation, RankPolicy, RoundContext};

struct Trace<'a> {
    inner: &'a mut dyn RankPolicy,
    rows: Vec<String>,
}

impl RankPolicy for Trace<'_> {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn begin_episode(&mut self) {
        self.inner.begin_episode()
    }
    fn act(&mut self, obs: &Observation, ctx: &RoundContext<'_>) -> Vec<u32> {
        self.decide(obs, ctx).unwrap_or_default()
    }
    fn decide(&mut self, obs: &Observation, ctx: &RoundContext<'_>) -> Option<Vec<u32>> {
        let d = self.inner.decide(obs, ctx);
        self.rows.push(match &d {
            None => "skip".into(),
            Some(p) => {
                let cost: f64 = p.iter().zip(ctx.unit_cost).map(|(&r, &u)| r as f64 * u).sum();
                let mean = p.iter().map(|&r| r as f64).sum::<f64>() / p.len() as f64;
                let max = p.iter().max().copied().unwrap_or(0);
                format!("{mean:5.1}/{max:2}/{:.2}", cost / ctx.conservative_budget)
            }
        });
        d
    }
    fn privileged(&self) -> bool {
        self.inner.privileged()
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let env_name = args.get(1).map_or("default-00", |s| s.as_str());
    let seed: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(1000);
    let suite = args.get(3).map_or("default", |s| s.as_str());
    let episodes: u64 = std::env::var("TRACE_EPISODES").ok().and_then(|e| e.parse().ok()).unwrap_or(50);
    let presets = envs::distribution::EnvSuite::load(suite)?.environments()?;
    let preset = presets.iter().find(|p| p.name == env_name).ok_or_else(|| anyhow::anyhow!("no {env_name}"))?;
    let spec = envs::EnvSpec::new(preset)?;
    let (meta, tensors) = runio::checkpoint::load(std::path::Path::new(&args[0]), runio::checkpoint::POLICY_KIND)?;
    let (model, cfg) =
        policies::trainer::policy_from_checkpoint(&meta.config, &meta.state, &tensors, tch::Device::Cpu)?;
    let p = &cfg.policy_preset;
    let prior = p.prior.enabled.then(|| {
        policies::model::PolicyModel::with_prior(
            tch::Device::Cpu,
            &cfg.schema.ranks,
            p.ppo.net,
            Default::default(),
            &p.prior,
        )
    });
    let mut greedy = policies::model::TrainedPolicy::greedy(&model, "policy");
    let mut oracle = envs::Baseline::Oracle.policy(&spec, seed);
    let mut uniform = envs::Baseline::Uniform.policy(&spec, seed);
    println!(
        "{env_name}: {} sites, {} rounds; each cell: mean rank / max rank / cost ÷ conservative budget",
        spec.n_sites(),
        preset.rounds
    );
    let mut prior_alone = prior.as_ref().map(|m| policies::model::TrainedPolicy::greedy(m, "prior"));
    let mut pols: Vec<(&str, &mut dyn RankPolicy)> =
        vec![("policy", &mut greedy), ("oracle", oracle.as_mut()), ("uniform", uniform.as_mut())];
    if let Some(p) = prior_alone.as_mut() {
        pols.push(("prior", p));
    }
    for (name, p) in pols {
        let mut t = Trace { inner: p, rows: Vec::new() };
        let env = envs::VecEnv::from_seeds(spec.clone(), &[seed]);
        let s = envs::eval::play_episode(env, &mut t)?;
        println!("{name:8} return {:8.3} final loss {:.3}", s.episode_return, s.final_loss);
        for (i, r) in t.rows.iter().enumerate() {
            print!("{r:>16}");
            if i % 6 == 5 {
                println!();
            }
        }
        println!();
        let (mut ret, mut skips, mut lost) = (0.0, 0usize, 0u32);
        for e in 0..episodes {
            let mut t = Trace { inner: &mut *t.inner, rows: Vec::new() };
            let env = envs::VecEnv::from_seeds(spec.clone(), &[seed + e]);
            let s = envs::eval::play_episode(env, &mut t)?;
            ret += s.episode_return;
            lost += s.violations;
            skips += t.rows.iter().filter(|r| *r == "skip").count();
        }
        println!(
            "{name:8} over {episodes} episodes: mean return {:.4}, skipped rounds {:.2}, lost rounds {:.2} per episode",
            ret / episodes as f64,
            skips as f64 / episodes as f64,
            lost as f64 / episodes as f64
        );
    }
    Ok(())
}
