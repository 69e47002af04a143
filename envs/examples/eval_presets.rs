//! Prints the baseline table of every embedded preset, plus a "structure probe" row: the
//! AdaLoRA-style allocation given each site's *preset-mean* spectral decay (role and depth
//! trend, no per-episode knowledge) and a conservative-budget plan. It is not a baseline; it
//! shows how much of the uniform→oracle gap the learnable structure alone can close.
//!
//! `cargo run --release -p envs --example eval_presets -- [episodes] [seed] [preset...]`
//!
//! Diagnostics for the model-based probe: `PROBE_TRUE_BETA=1` gives it the episode's true
//! decay exponents (privileged); `PROBE_BUDGET_FACTOR=f` plans against f × the estimated budget
//! instead of the conservative one.
#![allow(clippy::needless_range_loop)]
use envs::policy::{AdaloraPolicy, RankPolicy};
use envs::sites::power_law_tables;
use envs::{EnvSpec, GlobalFeature, Observation, RoundContext, SiteFeature};

/// AdaLoRA-style MCKP with per-site β from the preset's role/depth means.
struct RoleBetaProbe {
    betas: Vec<f64>,
    inner: AdaloraPolicy,
    solver: envs::oracle::MckpSolver,
}

impl RankPolicy for RoleBetaProbe {
    fn name(&self) -> String {
        "probe: role-β".into()
    }
    fn begin_episode(&mut self) {
        self.inner.begin_episode();
    }
    fn act(&mut self, obs: &Observation, ctx: &RoundContext<'_>) -> Vec<u32> {
        let ranks = ctx.rank_set.ranks();
        let k = ranks.len();
        let mut values = Vec::with_capacity(obs.n_sites * k);
        let mut costs = Vec::with_capacity(obs.n_sites * k);
        let mut e = vec![0f32; k];
        let mut t = vec![0f32; k];
        for (l, s) in ctx.sites.iter().enumerate() {
            power_law_tables(1.0, self.betas[l], s.max_rank(), ranks, &mut e, &mut t);
            let w = obs.site(l)[SiteFeature::Sensitivity] as f64;
            for j in 0..k {
                values.push(w * e[j] as f64);
                costs.push(ranks[j] as f64 * ctx.unit_cost[l]);
            }
        }
        let mut out = vec![0usize; obs.n_sites];
        match self.solver.solve(&values, &costs, k, ctx.conservative_budget, &mut out) {
            Some(_) => out.into_iter().map(|j| ranks[j]).collect(),
            None => vec![ranks[0]; obs.n_sites],
        }
    }
}

/// Model-based probe from observable quantities only: per-site E(r) from the preset-mean decay
/// of the site's role and depth (learnable from the role/depth features), EMA-smoothed
/// sensitivities, the current ranks, an estimate of the captured share from the round counter,
/// and the conservative estimated budget; solves the oracle's hold-the-plan knapsack.
struct ModelProbe {
    betas: Vec<f64>,
    eta: f64,
    rounds: f64,
    cost_coef: f64,
    ema: Vec<f64>,
    age: Vec<f64>,
    last: Vec<u32>,
    solver: envs::oracle::MckpSolver,
}

impl RankPolicy for ModelProbe {
    fn name(&self) -> String {
        "probe: model-based".into()
    }
    fn begin_episode(&mut self) {
        self.ema.clear();
    }
    fn privileged(&self) -> bool {
        std::env::var("PROBE_TRUE_BETA").is_ok()
    }
    fn act(&mut self, obs: &Observation, ctx: &RoundContext<'_>) -> Vec<u32> {
        let ranks = ctx.rank_set.ranks();
        let k = ranks.len();
        let n = obs.n_sites;
        if let Some(p) = ctx.privileged {
            // Diagnostic only: the episode's true decay exponents.
            self.betas = p.state.hidden_betas().iter().map(|&b| b as f64).collect();
        }
        if self.ema.len() != n {
            self.ema = (0..n).map(|l| obs.site(l)[SiteFeature::Sensitivity] as f64).collect();
            self.age = vec![0.0; n];
            self.last = vec![0; n];
        }
        let round = (obs.global[GlobalFeature::Progress] as f64 * self.rounds).round();
        let h = (self.rounds - round).max(1.0);
        let rho = 1.0 - self.eta;
        let s_h = rho * (1.0 - rho.powf(h)) / self.eta;
        let cap = match std::env::var("PROBE_BUDGET_FACTOR").ok().and_then(|f| f.parse::<f64>().ok()) {
            Some(f) => f * ctx.estimated_budget,
            None => ctx.conservative_budget,
        };
        let b = cap.max(1e-300);
        let mut values = Vec::with_capacity(n * k);
        let mut costs = Vec::with_capacity(n * k);
        let mut e = vec![0f32; k];
        let mut t = vec![0f32; k];
        for (l, s) in ctx.sites.iter().enumerate() {
            self.ema[l] = 0.85 * self.ema[l] + 0.15 * obs.site(l)[SiteFeature::Sensitivity] as f64;
            power_law_tables(1.0, self.betas[l], s.max_rank(), ranks, &mut e, &mut t);
            let cur = ctx
                .rank_set
                .index_of((obs.site(l)[SiteFeature::Rank] * ctx.rank_set.max() as f32).round() as u32)
                .unwrap_or(0);
            // Captured share: grown toward E(current) for `age` rounds.
            let q = e[cur] as f64 * (1.0 - rho.powf(self.age[l]));
            let w = self.ema[l] / n as f64;
            for j in 0..k {
                let en = e[j] as f64;
                let q0 = if j < cur && e[cur] > 0.0 { q * en / e[cur] as f64 } else { q };
                let cost = ranks[j] as f64 * ctx.unit_cost[l];
                values.push(w * (h * en - (en - q0).max(0.0) * s_h) - h * self.cost_coef * cost / b);
                costs.push(cost);
            }
        }
        let mut out = vec![0usize; n];
        let plan: Vec<u32> = match self.solver.solve(&values, &costs, k, ctx.conservative_budget, &mut out) {
            Some(_) => out.into_iter().map(|j| ranks[j]).collect(),
            None => vec![ranks[0]; n],
        };
        for l in 0..n {
            self.age[l] = if plan[l] == self.last[l] {
                self.age[l] + 1.0
            } else if plan[l] > self.last[l] {
                1.0
            } else {
                self.age[l] + 1.0
            };
            self.last[l] = plan[l];
        }
        plan
    }
}

fn main() -> Result<(), envs::EnvError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let episodes = args.first().and_then(|a| a.parse().ok()).unwrap_or(200);
    let seed = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(0);
    let names: Vec<String> =
        if args.len() > 2 { args[2..].to_vec() } else { envs::presets::NAMES.iter().map(|s| s.to_string()).collect() };
    for name in names {
        let preset = envs::presets::load(&name)?;
        let t0 = std::time::Instant::now();
        let mut table = envs::evaluate_baselines(&preset, &envs::Baseline::ALL, episodes, seed)?;
        let spec = EnvSpec::new(&preset)?;
        let max_layer = spec.sites.iter().map(|s| s.layer).max().unwrap_or(0).max(1) as f64;
        let sp = &preset.spectrum;
        let betas = spec
            .sites
            .iter()
            .map(|s| sp.beta.get(s.role) + sp.beta_depth_slope * (s.layer as f64 / max_layer - 0.5))
            .collect();
        let betas: Vec<f64> = betas;
        let mut probe =
            RoleBetaProbe { betas: betas.clone(), inner: AdaloraPolicy::new(0.75), solver: Default::default() };
        let mut model = ModelProbe {
            betas,
            eta: preset.dynamics.learning_rate,
            rounds: preset.rounds as f64,
            cost_coef: preset.reward.cost_coef,
            ema: Vec::new(),
            age: Vec::new(),
            last: Vec::new(),
            solver: Default::default(),
        };
        if preset.calibration_data.is_none() {
            table.push(envs::eval::evaluate_spec(&spec, &mut probe, episodes, seed)?);
            table.push(envs::eval::evaluate_spec(&spec, &mut model, episodes, seed)?);
        }
        println!("{}\n({:.1} s)\n", table.to_markdown(), t0.elapsed().as_secs_f64());
    }
    Ok(())
}
