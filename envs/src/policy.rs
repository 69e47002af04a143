//! The policy interface ([`RankPolicy`]) and the baselines: uniform, AdaLoRA-style, random, and
//! the privileged oracle.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::context::RoundContext;
use crate::observation::{Observation, SiteFeature};
use crate::oracle::Oracle;
use crate::sites::power_law_tables;
use crate::spec::EnvSpec;

/// A rank-allocation policy: one rank per site from the rank set, every round. Implement it in
/// another crate (e.g. a trained network) and pass it to [`crate::eval::evaluate`].
pub trait RankPolicy {
    /// Row name in evaluation tables.
    fn name(&self) -> String;
    /// Called before the first round of every episode.
    fn begin_episode(&mut self) {}
    /// The plan for this round: `obs.n_sites` rank values from `ctx.rank_set`.
    fn act(&mut self, obs: &Observation, ctx: &RoundContext<'_>) -> Vec<u32>;
    /// The plan, or `None` to skip the round (send nothing, keep the ranks; see
    /// [`crate::VecEnv::step_indices_skipping`]). By default a policy never skips.
    fn decide(&mut self, obs: &Observation, ctx: &RoundContext<'_>) -> Option<Vec<u32>> {
        Some(self.act(obs, ctx))
    }
    /// True if the policy needs [`RoundContext::privileged`] (only the oracle should).
    fn privileged(&self) -> bool {
        false
    }
}

/// The built-in policies, by name (for the CLI).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Baseline {
    /// [`UniformPolicy`].
    Uniform,
    /// [`AdaloraPolicy`].
    Adalora,
    /// [`RandomPolicy`].
    Random,
    /// [`OraclePolicy`].
    Oracle,
}

impl Baseline {
    /// All built-in policies.
    pub const ALL: [Baseline; 4] = [Baseline::Uniform, Baseline::Adalora, Baseline::Random, Baseline::Oracle];

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Baseline::Uniform => "uniform",
            Baseline::Adalora => "adalora",
            Baseline::Random => "random",
            Baseline::Oracle => "oracle",
        }
    }

    /// A fresh policy object; `seed` only matters for `random`.
    pub fn policy(self, spec: &EnvSpec, seed: u64) -> Box<dyn RankPolicy> {
        match self {
            Baseline::Uniform => Box::new(UniformPolicy),
            Baseline::Adalora => Box::new(AdaloraPolicy::new(spec.preset.baselines.adalora_beta)),
            Baseline::Random => Box::new(RandomPolicy::new(seed)),
            Baseline::Oracle => Box::new(OraclePolicy::default()),
        }
    }
}

impl std::str::FromStr for Baseline {
    type Err = crate::EnvError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Baseline::ALL.into_iter().find(|b| b.name() == s).ok_or_else(|| crate::EnvError::Config {
            key: "policy".into(),
            found: s.to_string(),
            allowed: "uniform, adalora, random, oracle".into(),
        })
    }
}

/// Largest uniform rank r (same at every site) whose plan fits the conservative estimated
/// budget; the smallest rank of the set if none fits.
#[derive(Debug, Clone, Copy, Default)]
pub struct UniformPolicy;

impl RankPolicy for UniformPolicy {
    fn name(&self) -> String {
        "uniform".into()
    }
    fn act(&mut self, obs: &Observation, ctx: &RoundContext<'_>) -> Vec<u32> {
        let per_rank: f64 = ctx.unit_cost.iter().sum();
        let r = ctx
            .rank_set
            .ranks()
            .iter()
            .rev()
            .copied()
            .find(|&r| r as f64 * per_rank <= ctx.conservative_budget)
            .unwrap_or(ctx.rank_set.rank(0));
        vec![r; obs.n_sites]
    }
}

/// AdaLoRA-style importance allocation: a global ranking of rank increments by importance per
/// unit cost, kept greedily until the conservative estimated budget is full — as AdaLoRA keeps
/// its top-budget singular triplets. The importance of growing site l from r to the next rank
/// r' is ŝ_l·(E₀_l(r') − E₀_l(r)), with ŝ_l the observed sensitivity smoothed across rounds by
/// AdaLoRA's EMA (β₁ = 0.85) and E₀ the energy curve of one common power law
/// (β = `baselines.adalora_beta`) for every site. It knows nothing site-specific about the
/// spectra and ignores the training state (e.g. the cost of shrinking).
#[derive(Debug, Clone)]
pub struct AdaloraPolicy {
    beta: f64,
    ema: Vec<f64>,
    e0: Vec<f64>,
    level: Vec<usize>,
    heap: std::collections::BinaryHeap<Candidate>,
}

/// A rank increment in the AdaLoRA greedy: ordered by importance per unit cost.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Candidate {
    ratio: f64,
    site: usize,
}

impl Eq for Candidate {}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Ties go to the lower site index, so plans are deterministic.
        self.ratio.total_cmp(&other.ratio).then(other.site.cmp(&self.site))
    }
}

impl AdaloraPolicy {
    /// With assumed common decay `beta`.
    pub fn new(beta: f64) -> Self {
        Self { beta, ema: Vec::new(), e0: Vec::new(), level: Vec::new(), heap: Default::default() }
    }
}

impl RankPolicy for AdaloraPolicy {
    fn name(&self) -> String {
        "adalora".into()
    }
    fn begin_episode(&mut self) {
        self.ema.clear();
    }
    fn act(&mut self, obs: &Observation, ctx: &RoundContext<'_>) -> Vec<u32> {
        let n = obs.n_sites;
        let ranks = ctx.rank_set.ranks();
        let k = ranks.len();
        if self.e0.len() != n * k {
            self.e0 = vec![0.0; n * k];
            let mut e = vec![0f32; k];
            let mut t = vec![0f32; k];
            for (l, s) in ctx.sites.iter().enumerate() {
                power_law_tables(1.0, self.beta, s.max_rank(), ranks, &mut e, &mut t);
                for j in 0..k {
                    self.e0[l * k + j] = e[j] as f64;
                }
            }
        }
        if self.ema.len() != n {
            self.ema = (0..n).map(|l| obs.site(l)[SiteFeature::Sensitivity] as f64).collect();
        }
        for l in 0..n {
            self.ema[l] = 0.85 * self.ema[l] + 0.15 * obs.site(l)[SiteFeature::Sensitivity] as f64;
        }
        let ratio = |ema: &[f64], e0: &[f64], l: usize, j: usize| -> f64 {
            let dc = (ranks[j + 1] - ranks[j]) as f64 * ctx.unit_cost[l];
            ema[l] * (e0[l * k + j + 1] - e0[l * k + j]) / dc.max(f64::MIN_POSITIVE)
        };
        self.level.clear();
        self.level.resize(n, 0);
        let mut cost = ranks[0] as f64 * ctx.unit_cost.iter().sum::<f64>();
        self.heap.clear();
        if k > 1 {
            for l in 0..n {
                self.heap.push(Candidate { ratio: ratio(&self.ema, &self.e0, l, 0), site: l });
            }
        }
        while let Some(c) = self.heap.pop() {
            let l = c.site;
            let j = self.level[l];
            let dc = (ranks[j + 1] - ranks[j]) as f64 * ctx.unit_cost[l];
            if cost + dc > ctx.conservative_budget {
                // This increment does not fit; the site stays where it is (smaller increments
                // of other sites may still fit).
                continue;
            }
            cost += dc;
            self.level[l] = j + 1;
            if j + 2 < k {
                self.heap.push(Candidate { ratio: ratio(&self.ema, &self.e0, l, j + 1), site: l });
            }
        }
        self.level.iter().map(|&j| ranks[j]).collect()
    }
}

/// Random plan: every site draws a rank uniformly from the set, then random sites are lowered
/// one step at a time until the plan fits the conservative estimated budget.
#[derive(Debug, Clone)]
pub struct RandomPolicy {
    rng: ChaCha8Rng,
}

impl RandomPolicy {
    /// Seeded random policy.
    pub fn new(seed: u64) -> Self {
        Self { rng: ChaCha8Rng::seed_from_u64(seed) }
    }
}

impl RankPolicy for RandomPolicy {
    fn name(&self) -> String {
        "random".into()
    }
    fn act(&mut self, obs: &Observation, ctx: &RoundContext<'_>) -> Vec<u32> {
        let n = obs.n_sites;
        let k = ctx.rank_set.len();
        let mut idx: Vec<usize> = (0..n).map(|_| self.rng.random_range(0..k)).collect();
        let mut cost: f64 = idx.iter().zip(ctx.unit_cost).map(|(&j, u)| ctx.rank_set.rank(j) as f64 * u).sum();
        let mut lowerable: Vec<usize> = (0..n).filter(|&l| idx[l] > 0).collect();
        while cost > ctx.conservative_budget && !lowerable.is_empty() {
            let p = self.rng.random_range(0..lowerable.len());
            let l = lowerable[p];
            let before = ctx.rank_set.rank(idx[l]) as f64;
            idx[l] -= 1;
            cost -= (before - ctx.rank_set.rank(idx[l]) as f64) * ctx.unit_cost[l];
            if idx[l] == 0 {
                lowerable.swap_remove(p);
            }
        }
        idx.into_iter().map(|j| ctx.rank_set.rank(j)).collect()
    }
}

/// The privileged oracle: knows the hidden spectra, weights, training state and this round's
/// true budget, and solves the round's allocation exactly as a multiple-choice knapsack
/// maximising this round's reward (one-step lookahead: it is greedy over rounds, so it is a
/// yardstick, not an upper bound on the episode return). Without privileged access it falls
/// back to [`UniformPolicy`].
#[derive(Debug, Clone, Default)]
pub struct OraclePolicy {
    oracle: Oracle,
}

impl RankPolicy for OraclePolicy {
    fn name(&self) -> String {
        "oracle".into()
    }
    fn privileged(&self) -> bool {
        true
    }
    fn act(&mut self, obs: &Observation, ctx: &RoundContext<'_>) -> Vec<u32> {
        match ctx.privileged {
            Some(p) => {
                let mut out = vec![0; obs.n_sites];
                self.oracle.plan_into(p.spec, p.state, &mut out);
                out
            }
            None => UniformPolicy.act(obs, ctx),
        }
    }
    /// Skips when the hold-the-plan value of skipping beats the best plan's (see
    /// [`Oracle::decide_into`]), so a policy that may skip is measured against an
    /// oracle that may too.
    fn decide(&mut self, obs: &Observation, ctx: &RoundContext<'_>) -> Option<Vec<u32>> {
        match ctx.privileged {
            Some(p) => {
                let mut out = vec![0; obs.n_sites];
                self.oracle.decide_into(p.spec, p.state, &mut out).map(|_| out)
            }
            None => Some(UniformPolicy.act(obs, ctx)),
        }
    }
}
