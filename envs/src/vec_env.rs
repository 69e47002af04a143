//! [`VecEnv`]: N environments of one spec stepped together with auto-reset, writing their
//! observations into shared row-major buffers; and [`VecEnvSnapshot`] to resume them exactly.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::EnvError;
use crate::context::{Privileged, RoundContext};
use crate::observation::{GLOBAL_FEATURES, Observation, SITE_FEATURES};
use crate::oracle::{Oracle, SolveStats};
use crate::presets::{EnvPreset, ResourceKind};
use crate::spec::EnvSpec;
use crate::state::{EnvState, EpisodeSummary, RoundOutcome};

/// Per-environment seed derived from one master seed (SplitMix64 of seed and index), so seeds of
/// neighbouring environments are unrelated.
pub fn derive_seed(seed: u64, index: u64) -> u64 {
    let mut z = seed ^ index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Serializable snapshot of a [`VecEnv`] (everything except the shared spec), for resuming.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VecEnvSnapshot {
    /// Preset name (checked on restore).
    pub preset: String,
    /// Per-environment states.
    pub states: Vec<EnvState>,
    /// Current global observations.
    pub obs_global: Vec<f32>,
    /// Current site observations.
    pub obs_sites: Vec<f32>,
}

/// N environments of one spec stepped together, with auto-reset.
///
/// Buffers are owned and reused: [`VecEnv::step`] does not allocate (apart from episodes
/// finished in that step being pushed into a reused vector).
#[derive(Debug, Clone)]
pub struct VecEnv {
    spec: Arc<EnvSpec>,
    states: Vec<EnvState>,
    obs_global: Vec<f32>,
    obs_sites: Vec<f32>,
    rewards: Vec<f32>,
    site_rewards: Vec<f32>,
    dones: Vec<bool>,
    outcomes: Vec<RoundOutcome>,
    finished: Vec<EpisodeSummary>,
    idx: Vec<u8>,
    costs: Vec<f64>,
    skip: Vec<bool>,
    /// The privileged oracle and its buffers ([`VecEnv::oracle_plan`]).
    oracle: Oracle,
}

impl VecEnv {
    /// `n_envs` environments of `preset`; environment i is seeded with `derive_seed(seed, i)`.
    pub fn new(preset: &EnvPreset, n_envs: usize, seed: u64) -> Result<Self, EnvError> {
        Ok(Self::from_spec(EnvSpec::new(preset)?, n_envs, seed))
    }

    /// Same as [`VecEnv::new`] with an already-built spec.
    pub fn from_spec(spec: Arc<EnvSpec>, n_envs: usize, seed: u64) -> Self {
        let seeds: Vec<u64> = (0..n_envs as u64).map(|i| derive_seed(seed, i)).collect();
        Self::from_seeds(spec, &seeds)
    }

    /// One environment per explicit seed.
    pub fn from_seeds(spec: Arc<EnvSpec>, seeds: &[u64]) -> Self {
        let states = seeds.iter().map(|&s| EnvState::new(&spec, s)).collect();
        Self::with_states(spec, states, true)
    }

    fn with_states(spec: Arc<EnvSpec>, states: Vec<EnvState>, write: bool) -> Self {
        let n_envs = states.len();
        let n = spec.n_sites();
        let mut v = Self {
            obs_global: vec![0.0; n_envs * GLOBAL_FEATURES],
            obs_sites: vec![0.0; n_envs * n * SITE_FEATURES],
            rewards: vec![0.0; n_envs],
            site_rewards: vec![0.0; n_envs * n],
            dones: vec![false; n_envs],
            outcomes: vec![RoundOutcome::default(); n_envs],
            finished: Vec::with_capacity(n_envs),
            idx: vec![0; n_envs * n],
            costs: vec![0.0; n_envs],
            skip: vec![false; n_envs],
            oracle: Oracle::new(),
            spec,
            states,
        };
        if write {
            for i in 0..n_envs {
                v.write_obs(i);
            }
        }
        v
    }

    fn write_obs(&mut self, i: usize) {
        let n = self.spec.n_sites();
        let g = &mut self.obs_global[i * GLOBAL_FEATURES..(i + 1) * GLOBAL_FEATURES];
        let s = &mut self.obs_sites[i * n * SITE_FEATURES..(i + 1) * n * SITE_FEATURES];
        self.states[i].write_obs(&self.spec, g, s);
    }

    /// Restores from a snapshot taken with [`VecEnv::snapshot`] on the same preset; stepping
    /// then continues exactly as the original would have.
    pub fn restore(spec: Arc<EnvSpec>, snap: VecEnvSnapshot) -> Result<Self, EnvError> {
        let n = spec.n_sites();
        let ne = snap.states.len();
        let ok = snap.preset == spec.preset.name
            && snap.obs_global.len() == ne * GLOBAL_FEATURES
            && snap.obs_sites.len() == ne * n * SITE_FEATURES
            && snap.states.iter().all(|s| s.fits(&spec));
        if !ok {
            return Err(EnvError::Config {
                key: "snapshot".into(),
                found: snap.preset,
                allowed: format!("a snapshot of preset {} with {} sites", spec.preset.name, n),
            });
        }
        // The observation noise was already drawn from each stream, so the buffers are restored
        // rather than re-drawn.
        let mut v = Self::with_states(spec, snap.states, false);
        v.obs_global = snap.obs_global;
        v.obs_sites = snap.obs_sites;
        Ok(v)
    }

    /// Snapshot of all environment states (serde-serializable).
    pub fn snapshot(&self) -> VecEnvSnapshot {
        VecEnvSnapshot {
            preset: self.spec.preset.name.clone(),
            states: self.states.clone(),
            obs_global: self.obs_global.clone(),
            obs_sites: self.obs_sites.clone(),
        }
    }

    /// The shared spec.
    pub fn spec(&self) -> &Arc<EnvSpec> {
        &self.spec
    }

    /// Number of environments.
    pub fn n_envs(&self) -> usize {
        self.states.len()
    }

    /// Number of sites per environment.
    pub fn n_sites(&self) -> usize {
        self.spec.n_sites()
    }

    /// Global observations, `n_envs × GLOBAL_FEATURES`.
    pub fn obs_global(&self) -> &[f32] {
        &self.obs_global
    }

    /// Site observations, `n_envs × n_sites × SITE_FEATURES`.
    pub fn obs_sites(&self) -> &[f32] {
        &self.obs_sites
    }

    /// Copy of environment `i`'s observation.
    pub fn observation(&self, i: usize) -> Observation {
        let n = self.spec.n_sites();
        Observation {
            global: self.obs_global[i * GLOBAL_FEATURES..(i + 1) * GLOBAL_FEATURES].to_vec(),
            sites: self.obs_sites[i * n * SITE_FEATURES..(i + 1) * n * SITE_FEATURES].to_vec(),
            n_sites: n,
        }
    }

    /// Rewards of the last step.
    pub fn rewards(&self) -> &[f32] {
        &self.rewards
    }

    /// The last step's rewards split over the sites, `n_envs × n_sites` (row e sums to
    /// `rewards()[e]`): for per-site credit assignment in training. See `EnvState::play`.
    pub fn site_rewards(&self) -> &[f32] {
        &self.site_rewards
    }

    /// Episode-end flags of the last step (the observation is then already the next episode's).
    pub fn dones(&self) -> &[bool] {
        &self.dones
    }

    /// Per-environment details of the last step.
    pub fn outcomes(&self) -> &[RoundOutcome] {
        &self.outcomes
    }

    /// Episodes finished in the last step.
    pub fn finished(&self) -> &[EpisodeSummary] {
        &self.finished
    }

    /// Environment `i`'s state (read-only; hidden fields are privileged).
    pub fn state(&self, i: usize) -> &EnvState {
        &self.states[i]
    }

    /// What a policy of environment `i` may use besides the observation.
    pub fn context(&self, i: usize) -> RoundContext<'_> {
        let st = &self.states[i];
        RoundContext {
            rank_set: &self.spec.rank_set,
            sites: &self.spec.sites,
            unit_cost: &self.spec.unit_cost,
            resource: self.spec.resource.kind(),
            estimated_budget: st.estimated_budget(),
            conservative_budget: st.conservative_budget(),
            cost_coef: self.spec.preset.reward.cost_coef,
            privileged: None,
        }
    }

    /// Like [`VecEnv::context`] plus privileged access (for the oracle and diagnostics).
    pub fn privileged_context(&self, i: usize) -> RoundContext<'_> {
        let mut c = self.context(i);
        c.privileged = Some(Privileged { spec: &self.spec, state: &self.states[i] });
        c
    }

    /// Steps every environment with `ranks` (`n_envs × n_sites` rank values, row-major). The
    /// whole batch is validated first, so on error no environment has moved.
    pub fn step(&mut self, ranks: &[u32]) -> Result<(), EnvError> {
        let n = self.spec.n_sites();
        let ne = self.states.len();
        if ranks.len() != ne * n {
            return Err(EnvError::ActionLength { expected: ne * n, found: ranks.len() });
        }
        let rs = &self.spec.rank_set;
        for e in 0..ne {
            let mut cost = 0.0;
            for l in 0..n {
                let r = ranks[e * n + l];
                match rs.index_of(r) {
                    Some(j) => {
                        self.idx[e * n + l] = j as u8;
                        cost += r as f64 * self.spec.unit_cost[l];
                    }
                    None => return Err(self.spec.rank_error(e, l, r)),
                }
            }
            self.costs[e] = cost;
        }
        self.skip.fill(false);
        self.step_validated();
        Ok(())
    }

    /// Steps with rank *indices* into the rank set (what a categorical policy samples); errors
    /// on an index out of range.
    pub fn step_indices(&mut self, indices: &[u8]) -> Result<(), EnvError> {
        self.skip.fill(false);
        self.step_indices_inner(indices)
    }

    /// [`VecEnv::step_indices`] where environment e skips its round when `skip[e]` is true: it
    /// sends nothing, trains nothing and keeps its ranks (its indices are ignored), and its
    /// reward is the loss carried through the round. Skipping exists for per-round resources
    /// (a channel, a compute budget); with a fixed parameter budget the adapter's parameters
    /// exist whether or not the round is played, so a skip is refused there.
    pub fn step_indices_skipping(&mut self, indices: &[u8], skip: &[bool]) -> Result<(), EnvError> {
        if skip.len() != self.states.len() {
            return Err(EnvError::ActionLength { expected: self.states.len(), found: skip.len() });
        }
        if skip.iter().any(|&s| s) && self.spec.resource.kind() == ResourceKind::Budget {
            return Err(EnvError::Config {
                key: "skip".into(),
                found: format!("a skipped round on preset `{}` (resource kind `budget`)", self.spec.preset.name),
                allowed: "skipping on presets whose resource is a channel or a compute budget".into(),
            });
        }
        self.skip.copy_from_slice(skip);
        self.step_indices_inner(indices)
    }

    /// The current rank index of every site of environment `i` (what a skip keeps).
    pub fn rank_indices(&self, i: usize) -> &[u8] {
        &self.states[i].rank_idx
    }

    fn step_indices_inner(&mut self, indices: &[u8]) -> Result<(), EnvError> {
        let n = self.spec.n_sites();
        let ne = self.states.len();
        if indices.len() != ne * n {
            return Err(EnvError::ActionLength { expected: ne * n, found: indices.len() });
        }
        let k = self.spec.rank_set.len();
        for e in 0..ne {
            let mut cost = 0.0;
            for l in 0..n {
                let j = indices[e * n + l] as usize;
                if j >= k {
                    return Err(self.spec.rank_error(e, l, u32::MAX));
                }
                cost += self.spec.rank_set.rank(j) as f64 * self.spec.unit_cost[l];
            }
            self.costs[e] = if self.skip[e] { 0.0 } else { cost };
        }
        self.idx.copy_from_slice(indices);
        self.step_validated();
        Ok(())
    }

    fn step_validated(&mut self) {
        let n = self.spec.n_sites();
        self.finished.clear();
        for e in 0..self.states.len() {
            let st = &mut self.states[e];
            let out = st.play(
                &self.spec,
                &self.idx[e * n..(e + 1) * n],
                self.costs[e],
                self.skip[e],
                &mut self.site_rewards[e * n..(e + 1) * n],
            );
            self.outcomes[e] = out;
            self.rewards[e] = out.reward as f32;
            let fin = st.advance(&self.spec, e, out.reward);
            self.dones[e] = fin.is_some();
            if let Some(s) = fin {
                self.finished.push(s);
            }
            self.write_obs(e);
        }
    }

    /// The oracle's plan for environment `i` this round (privileged: true spectra, weights,
    /// state and budget); see [`crate::oracle`].
    pub fn oracle_plan(&mut self, i: usize) -> (Vec<u32>, SolveStats) {
        let mut out = vec![0u32; self.spec.n_sites()];
        let stats = self.oracle.plan_into(&self.spec, &self.states[i], &mut out);
        (out, stats)
    }

    /// The oracle's decision for environment `i` this round: its plan, and whether it plays the
    /// round (`false` where skipping is worth more; see [`Oracle::decide_into`]). The plan is
    /// the one it would play either way. Privileged, like [`VecEnv::oracle_plan`]: for a
    /// teacher in training, never for a policy's own decisions.
    pub fn oracle_decision(&mut self, i: usize) -> (Vec<u32>, bool) {
        let mut out = vec![0u32; self.spec.n_sites()];
        let plays = self.oracle.decide_into(&self.spec, &self.states[i], &mut out).is_some();
        (out, plays)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presets;

    #[test]
    fn a_skipped_round_keeps_everything_but_the_round() {
        let p = presets::load("wireless-rayleigh").unwrap();
        let mut a = VecEnv::new(&p, 2, 3).unwrap();
        let n = a.n_sites();
        // Round 0 at rank 8 everywhere (index 4): both environments learn something.
        a.step_indices(&vec![4u8; 2 * n]).unwrap();
        let before: Vec<(f64, Vec<u8>)> = (0..2).map(|e| (a.state(e).loss(), a.rank_indices(e).to_vec())).collect();
        // Environment 0 skips while asking for rank 0 (ignored); environment 1 plays rank 0.
        a.step_indices_skipping(&vec![0u8; 2 * n], &[true, false]).unwrap();
        let o = a.outcomes()[0];
        assert!(o.skipped && !o.violation);
        assert_eq!((o.cost, o.cost_ratio), (0.0, 0.0));
        assert_eq!(a.state(0).loss(), before[0].0, "no progress and no loss of captured energy");
        assert_eq!(a.rank_indices(0), before[0].1.as_slice(), "ranks are kept");
        assert_eq!(o.reward, -before[0].0);
        let site_sum: f64 = a.site_rewards()[..n].iter().map(|&r| r as f64).sum();
        assert!((site_sum - o.reward).abs() < 1e-4, "site rewards sum to the reward: {site_sum} vs {}", o.reward);
        // The other environment did play: shrinking to 0 lost its captured energy.
        assert!(!a.outcomes()[1].skipped);
        assert!(a.state(1).loss() > before[1].0);
        assert!(a.rank_indices(1).iter().all(|&j| j == 0));
        // Skips are counted in the episode summary.
        for _ in 2..p.rounds {
            a.step_indices_skipping(&vec![4u8; 2 * n], &[true, true]).unwrap();
        }
        let f = a.finished();
        assert_eq!(f.len(), 2);
        assert_eq!((f[0].skips, f[1].skips), (p.rounds - 1, p.rounds - 2));
    }

    #[test]
    fn skipping_is_refused_with_a_parameter_budget() {
        let p = presets::load("budget").unwrap();
        let mut a = VecEnv::new(&p, 1, 0).unwrap();
        let n = a.n_sites();
        let e = a.step_indices_skipping(&vec![0u8; n], &[true]).unwrap_err().to_string();
        assert!(e.contains("skip") && e.contains("channel or a compute budget"), "{e}");
        // Not skipping is fine there, and a wrong-length skip mask is an error.
        a.step_indices_skipping(&vec![0u8; n], &[false]).unwrap();
        assert!(a.step_indices_skipping(&vec![0u8; n], &[false, false]).is_err());
    }
}
