//! [`RoundContext`]: what a policy may use besides the observation, shared by the simulator
//! ([`crate::VecEnv::context`]), real runs and the policies. Its own module so that the policies
//! and the environment each depend on it, not on one another.

use crate::presets::ResourceKind;
use crate::sites::{RankSet, Site};
use crate::spec::EnvSpec;
use crate::state::EnvState;

/// What a policy may use besides the observation: the rank set, the sites, the cost of each
/// rank unit, and the round's budget as estimated from the observation. A feasibility
/// projection needs exactly this.
#[derive(Debug, Clone, Copy)]
pub struct RoundContext<'a> {
    /// Allowed ranks.
    pub rank_set: &'a RankSet,
    /// The sites (shapes, roles, names).
    pub sites: &'a [Site],
    /// Cost of one rank unit per site, in the resource's unit.
    pub unit_cost: &'a [f64],
    /// Which resource.
    pub resource: ResourceKind,
    /// The round's budget implied by the noisy estimate (no safety margin).
    pub estimated_budget: f64,
    /// The estimated budget after the preset's baseline safety margin.
    pub conservative_budget: f64,
    /// The run's price of the resource: the reward's cost coefficient λ (a setting of the run,
    /// like the budget, not something to infer).
    pub cost_coef: f64,
    /// Privileged access to the hidden state; only given to policies whose
    /// [`crate::RankPolicy::privileged`] is true (the oracle).
    pub privileged: Option<Privileged<'a>>,
}

impl RoundContext<'_> {
    /// Cost of a plan (rank values) in the resource's unit. Ranks outside the set are costed at
    /// face value; lengths must match.
    pub fn plan_cost(&self, ranks: &[u32]) -> f64 {
        ranks.iter().zip(self.unit_cost).map(|(&r, u)| r as f64 * u).sum()
    }
}

/// Privileged view of one environment: the true budget and the hidden state.
#[derive(Debug, Clone, Copy)]
pub struct Privileged<'a> {
    /// The environment's spec.
    pub spec: &'a EnvSpec,
    /// The environment's full state.
    pub state: &'a EnvState,
}

impl Privileged<'_> {
    /// The round's true budget.
    pub fn true_budget(&self) -> f64 {
        self.state.true_budget()
    }
}
