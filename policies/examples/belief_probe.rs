//! How much the prior's beliefs matter, on the held-out suite: the prior alone (no network, with
//! its skip margin) with the fixed beliefs of `PriorConfig`, inferring them online
//! (`prior.infer`, at the belief's λ and at the run's λ), and — a privileged probe — with the
//! fixed beliefs set to each environment's true constants (horizon, η, L∞, λ, kind means of β,
//! tail noise). Gap closed per environment and on average.
//!
//! `cargo run --release -p policies --example belief_probe -- [episodes] [seed]`
use envs::{GlobalFeature, Observation, RankPolicy, RoundContext};
use policies::belief::Belief;
use policies::model::{BudgetContext, ObsBatch};
use policies::prior::{Prior, PriorConfig, PriorPolicy, RoleBeta};

/// The prior with its skip decision (skip when its skip margin is positive and the resource
/// allows it), as an untrained default-preset policy acts.
struct SkippingPrior {
    inner: PriorPolicy,
    /// Pass the run's λ (else the belief's).
    run_cost_coef: bool,
}

impl RankPolicy for SkippingPrior {
    fn name(&self) -> String {
        "prior".into()
    }

    fn begin_episode(&mut self) {
        self.inner.begin_episode();
    }

    fn act(&mut self, obs: &Observation, ctx: &RoundContext<'_>) -> Vec<u32> {
        // Without the option to skip, keep the current plan (what a skip keeps).
        let r_max = ctx.rank_set.max() as f32;
        self.decide(obs, ctx).unwrap_or_else(|| {
            (0..obs.n_sites).map(|l| (obs.site(l)[envs::SiteFeature::Rank] * r_max).round() as u32).collect()
        })
    }

    fn decide(&mut self, obs: &Observation, ctx: &RoundContext<'_>) -> Option<Vec<u32>> {
        let dims: Vec<u32> = ctx.sites.iter().map(|s| s.max_rank()).collect();
        let budget = BudgetContext {
            unit_cost: ctx.unit_cost,
            budgets: &[ctx.conservative_budget],
            dims: Some(&dims),
            cost_coef: self.run_cost_coef.then_some(ctx.cost_coef),
        };
        // The values see this round's observation; the belief keeps it whichever way we go.
        let mut belief = [self.inner.belief.clone()];
        let want = policies::prior::Want { values: true, skip: true, estimates: false, loss_quantile: 0.0 };
        let out = self.inner.prior.evaluate(ObsBatch::one(obs), budget, &mut belief, want);
        let (values, margin) = (out.values, out.skip_margin);
        let [belief] = belief;
        self.inner.belief = belief;
        if obs.global[GlobalFeature::ResourceBudget] == 0.0 && margin[0] > 0.0 {
            return None;
        }
        Some(self.inner.prior.plan_from_values(&values, budget).into_iter().map(|j| ctx.rank_set.rank(j)).collect())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let episodes: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(100);
    let seed: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1000);
    let variants = ["fixed", "infer, belief λ", "infer, run's λ", "true constants (privileged)"];
    let suite = envs::distribution::EnvSuite::load("default")?;
    let environments = suite.environments()?;
    let mut sums = [0.0; 4];
    println!("{:<20} {}", "gap closed", variants.map(|v| format!("{v:>28}")).join(""));
    for preset in &environments {
        let spec = envs::EnvSpec::new(preset)?;
        let mut table =
            envs::evaluate_baselines(preset, &[envs::Baseline::Uniform, envs::Baseline::Oracle], episodes, seed)?;
        for (i, name) in variants.iter().enumerate() {
            let mut cfg =
                PriorConfig { enabled: true, loss_floor: Some(0.5), infer: i == 1 || i == 2, ..Default::default() };
            if i == 3 {
                let (d, b) = (&preset.dynamics, &preset.spectrum.beta);
                cfg.rounds = preset.rounds as f64;
                cfg.eta = d.learning_rate;
                cfg.loss_floor = Some(d.loss_floor);
                cfg.cost_coef = preset.reward.cost_coef;
                cfg.beta = RoleBeta {
                    qk: (b.q + b.k) / 2.0,
                    vo: (b.v + b.o) / 2.0,
                    mlp_in: (b.gate + b.up) / 2.0,
                    mlp_out: b.down,
                };
                cfg.beta_depth_slope = preset.spectrum.beta_depth_slope;
                cfg.tail_noise = preset.observation.tail_noise;
            }
            let inner =
                PriorPolicy { prior: Prior::new(cfg, spec.rank_set.ranks()), use_dims: true, belief: Belief::new() };
            let mut policy = SkippingPrior { inner, run_cost_coef: i == 2 };
            let mut row = envs::evaluate(preset, &mut policy, episodes, seed)?;
            row.name = name.to_string();
            table.push(row);
        }
        table.fill_gap();
        let gaps: Vec<f64> = table.rows[2..].iter().map(|r| r.oracle_gap_closed.unwrap_or(f64::NAN)).collect();
        println!("{:<20} {}", preset.name, gaps.iter().map(|g| format!("{g:>28.3}")).collect::<String>());
        sums.iter_mut().zip(&gaps).for_each(|(s, g)| *s += g);
    }
    let n = environments.len() as f64;
    println!("{:<20} {}", "mean", sums.iter().map(|s| format!("{:>28.3}", s / n)).collect::<String>());
    Ok(())
}
