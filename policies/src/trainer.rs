//! The training loop: rollouts from a vectorized environment, PPO updates, DDIM updates
//! alternating with them, and the exact state needed to resume.
//!
//! One call to [`Trainer::iterate`] is one PPO iteration: `num_steps` rounds from `num_envs`
//! environments, then the PPO epochs, then (with DDIM) `updates_per_iteration` denoiser steps on
//! the replay buffer. The caller (the `rankpilot train` command) owns logging, evaluation and
//! checkpoint files; [`Trainer::checkpoint_parts`] / [`Trainer::restore`] carry everything a
//! resumed run needs to continue exactly as an uninterrupted one on the CPU: weights, Adam
//! moments, observation statistics, RNG state, environment states, the replay buffer.

use crate::PolicyError;
use crate::belief::Belief;
use std::sync::Arc;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use envs::distribution::EnvDistribution;
use envs::{EnvPreset, EnvSpec, EpisodeSummary, GLOBAL_FEATURES, SITE_FEATURES, VecEnv, VecEnvSnapshot};

use crate::adam::Adam;
use crate::ddim::{self, DdimConfig, Replay};
use crate::model::{self, ActMode, Branch, BudgetContext, ObsBatch, PolicyModel, Schema};
use crate::network::DeferInputs;
use crate::ppo::{self, Batch, Credit, PpoConfig, UpdateStats};
use crate::prior::PriorConfig;

/// A policy/training preset (`policies/presets/*.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyPreset {
    /// Preset name.
    pub name: String,
    /// One line about it.
    #[serde(default)]
    pub description: String,
    /// PPO hyperparameters.
    #[serde(default)]
    pub ppo: PpoConfig,
    /// DDIM refinement stage.
    #[serde(default)]
    pub ddim: DdimConfig,
    /// Model-based prior the network's logits are a residual to (off when absent).
    #[serde(default)]
    pub prior: PriorConfig,
}

impl rankpilot_config::Validate for PolicyPreset {
    fn validate(&self, v: &mut rankpilot_config::Violations) {
        v.nested("ppo", &self.ppo);
        v.nested("ddim", &self.ddim);
        v.nested("prior", &self.prior);
        v.check(
            (0.0..0.5).contains(&self.ppo.net.loss_quantile),
            "ppo.net.loss_quantile",
            self.ppo.net.loss_quantile,
            "a probability in [0, 0.5) (0: plans fit the environment's conservative budget)",
        );
        v.check(
            self.ppo.net.loss_quantile == 0.0 || (self.ppo.net.estimates && !self.prior.enabled),
            "ppo.net.loss_quantile",
            self.ppo.net.loss_quantile,
            "0 unless ppo.net.estimates is true and the prior is off (the prior weighs the risk itself)",
        );
        v.check(
            !self.ppo.net.rank_head || self.ppo.net.estimates,
            "ppo.net.rank_head",
            self.ppo.net.rank_head,
            "false unless ppo.net.estimates is true (the head reads each rank's estimates)",
        );
        v.check(
            (0.0..1.0).contains(&self.ppo.net.keep),
            "ppo.net.keep",
            self.ppo.net.keep,
            "a probability in [0, 1) (1 would never redraw a rank)",
        );
        v.check(
            self.ppo.prior_kl_coef == 0.0 || self.prior.enabled,
            "ppo.prior_kl_coef",
            self.ppo.prior_kl_coef,
            "0 unless [prior] is enabled (the anchor is the prior's policy)",
        );
        v.check(
            self.ppo.teacher_targets == ppo::TeacherTargets::All || self.ppo.net.skip,
            "ppo.teacher_targets",
            "skip",
            "\"all\" unless ppo.net.skip is true (there is no skip decision to teach)",
        );
        v.check(
            self.ppo.skip_vine.is_finite() && self.ppo.skip_vine >= 0.0,
            "ppo.skip_vine",
            self.ppo.skip_vine,
            "a finite number of branched rounds per episode, >= 0",
        );
        v.check(
            self.ppo.skip_vine == 0.0 || self.ppo.net.skip || self.ppo.net.defer,
            "ppo.skip_vine",
            self.ppo.skip_vine,
            "0 unless ppo.net.skip or ppo.net.defer is true (there is no decision to branch on)",
        );
        v.check(
            !self.ppo.net.defer || (self.prior.enabled && self.ppo.skip_vine > 0.0),
            "ppo.net.defer",
            self.ppo.net.defer,
            "false unless [prior] is enabled and ppo.skip_vine > 0 (the head hands rounds to the prior and learns on the vine branches)",
        );
        v.check(
            !self.ppo.net.prior_ranks || self.prior.enabled,
            "ppo.net.prior_ranks",
            self.ppo.net.prior_ranks,
            "false unless [prior] is enabled (the ranks are the prior's)",
        );
        v.check(
            self.ppo.defer_learning_rate.is_finite() && self.ppo.defer_learning_rate > 0.0,
            "ppo.defer_learning_rate",
            self.ppo.defer_learning_rate,
            "a finite learning rate > 0",
        );
    }
}

/// Presets shipped in `policies/presets/`, embedded in the binary.
pub const EMBEDDED_PRESETS: &[(&str, &str)] = &[
    ("default", include_str!("../presets/default.toml")),
    ("ddim", include_str!("../presets/ddim.toml")),
    ("tiny", include_str!("../presets/tiny.toml")),
    ("ppo", include_str!("../presets/ppo.toml")),
];

/// Loads a policy preset by embedded name or by path.
pub fn load_preset(name_or_path: &str) -> Result<PolicyPreset, rankpilot_config::ConfigError> {
    if let Some((name, text)) = EMBEDDED_PRESETS.iter().find(|(n, _)| *n == name_or_path) {
        return rankpilot_config::from_str(text, format!("policies/presets/{name}.toml"));
    }
    let path = std::path::Path::new(name_or_path);
    if !path.exists() && !name_or_path.ends_with(".toml") {
        let names: Vec<&str> = EMBEDDED_PRESETS.iter().map(|(n, _)| *n).collect();
        return Err(rankpilot_config::ConfigError::Parse {
            file: path.to_path_buf(),
            key: String::new(),
            message: format!("no such policy preset; allowed: {} or a path to a .toml file", names.join(", ")),
        });
    }
    rankpilot_config::load(path)
}

/// What one iteration did.
#[derive(Debug, Clone, Default)]
pub struct IterationStats {
    /// Iteration number (1-based after the call).
    pub iteration: usize,
    /// Environment steps so far (rounds × environments).
    pub global_step: u64,
    /// PPO update statistics.
    pub update: UpdateStats,
    /// Mean DDIM loss of this iteration's denoiser steps (NaN when none ran).
    pub ddim_loss: f64,
    /// Episodes that finished during the rollout.
    pub episodes: Vec<EpisodeSummary>,
    /// Executed ranks of the last rollout step, all environments and sites.
    pub last_ranks: Vec<u32>,
    /// Ranks of the last finished episode of environment 0, rounds × sites (row-major).
    pub episode_ranks: Option<(usize, Vec<u32>)>,
    /// Mean reward over the rollout.
    pub mean_reward: f64,
    /// Share of the rollout's sampled site decisions that a binding budget trimmed (their
    /// feasibility mask removed more than 1 % of their priced probability).
    pub trimmed_share: f64,
    /// Mean spend level softplus(z_price) over the rollout's decisions, with `net.price`
    /// (NaN otherwise).
    pub spend_price: f64,
    /// With a privileged teacher: the share of played site decisions whose sampled rank is the
    /// oracle's (NaN without a teacher).
    pub teacher_agreement: f64,
    /// With `ppo.reference_rollout`: the mean reward over the rollout minus the reference
    /// twins' (the untrained policy's greedy plan on the same draws); NaN without.
    pub reward_over_reference: f64,
    /// With a privileged teacher: the weight c_T of this iteration's update (0 without).
    pub teacher_weight: f64,
    /// With `ppo.skip_vine`: the branched states where skipping was allowed (0 without).
    pub vine_states: usize,
    /// With `ppo.skip_vine`: the share of branched states where skipping returned more than
    /// playing (NaN without, or with none branched).
    pub vine_skip_better: f64,
    /// With `net.defer`: the branched states where the prior's decision and the learned one
    /// returned differently (0 without).
    pub defer_states: usize,
    /// With `net.defer`: the share of those where the prior's returned more (NaN without).
    pub defer_prior_better: f64,
    /// With `net.defer`: the share of branched states where the greedy policy defers (NaN
    /// without).
    pub defer_share: f64,
    /// With `net.defer`: the defer head's mean loss ([`ppo::defer_loss`]; NaN without).
    pub defer_loss: f64,
    /// Wall time of the rollout (s).
    pub rollout_s: f64,
    /// Wall time of the PPO and DDIM updates (s).
    pub update_s: f64,
}

/// The state of a training run.
pub struct Trainer {
    /// The policy being trained.
    pub model: PolicyModel,
    /// Policy preset.
    pub preset: PolicyPreset,
    /// Environment preset.
    pub env_preset: EnvPreset,
    /// Total environment steps planned (for LR annealing).
    pub total_steps: u64,
    /// The run's seed.
    pub seed: u64,
    /// The distribution environments are drawn from, one draw per episode of each group
    /// (`None`: every episode is of `env_preset`).
    pub distribution: Option<EnvDistribution>,
    groups: Vec<EnvGroup>,
    draws: u64,
    opt: Adam,
    ddim_opt: Option<Adam>,
    /// Adam over the defer head's weights (`defer.*`), with `net.defer`.
    defer_opt: Option<Adam>,
    replay: Option<Replay>,
    rng: ChaCha8Rng,
    /// Iterations done.
    pub iteration: usize,
    /// Environment steps done.
    pub global_step: u64,
    episode_ranks_env0: Vec<u32>,
    /// With `ppo.reference_rollout`: the untrained policy whose greedy plans play the twins.
    reference_model: Option<PolicyModel>,
}

/// Environments stepped together that share one preset: with a distribution, a group draws a new
/// preset whenever its episodes end (they end together: one preset, one horizon).
struct EnvGroup {
    venv: VecEnv,
    /// Each environment's episode history, for a prior that infers.
    beliefs: Vec<Belief>,
    /// The draw's seed (`None`: the run's fixed preset).
    draw: Option<u64>,
    /// With `ppo.reference_rollout`: the twins, on the same random streams.
    reference: Option<Twins>,
    /// What this group's rewards are multiplied by before GAE, besides `ppo.reward_scale`:
    /// 1 / its gap with `ppo.reward_per_gap`, else 1.
    reward_weight: f32,
}

/// Copies of a group's environments, played by the reference policy ([`PpoConfig::reference_rollout`]).
struct Twins {
    venv: VecEnv,
    beliefs: Vec<Belief>,
}

impl EnvGroup {
    /// A group at the start of its episodes; with `twins`, a copy of each environment (same
    /// state, same random stream) for the reference policy.
    fn new(venv: VecEnv, draw: Option<u64>, twins: bool, reward_weight: f32) -> Self {
        let beliefs = vec![Belief::new(); venv.n_envs()];
        let reference = twins.then(|| Twins { venv: venv.clone(), beliefs: beliefs.clone() });
        EnvGroup { beliefs, venv, draw, reference, reward_weight }
    }
}

/// The reward weight of an environment for `ppo.reward_per_gap`: 1 / (the oracle's mean return
/// − uniform's) over [`ppo::GAP_EPISODES`] episodes from `seed`, the gap floored at
/// [`ppo::GAP_FLOOR`]; 1 when `per_gap` is off. A function of the environment and the seed only,
/// so a resumed run recomputes it exactly.
fn reward_weight(spec: &Arc<EnvSpec>, seed: u64, per_gap: bool) -> Result<f32, PolicyError> {
    if !per_gap {
        return Ok(1.0);
    }
    let mean_return = |b: envs::Baseline| -> Result<f64, PolicyError> {
        let mut policy = b.policy(spec, envs::derive_seed(seed, u64::MAX));
        Ok(envs::eval::evaluate_spec(spec, policy.as_mut(), ppo::GAP_EPISODES, seed)?.mean_return)
    };
    let gap = mean_return(envs::Baseline::Oracle)? - mean_return(envs::Baseline::Uniform)?;
    Ok((1.0 / gap.max(ppo::GAP_FLOOR)) as f32)
}

/// One decision for every environment of `venv` (the budgets and site shapes read from it).
fn act_on(model: &PolicyModel, venv: &VecEnv, beliefs: &mut [Belief], mode: ActMode<'_>) -> model::Decision {
    let (ne, l) = (venv.n_envs(), venv.n_sites());
    let budgets: Vec<f64> = (0..ne).map(|i| venv.context(i).conservative_budget).collect();
    let dims: Vec<u32> = venv.spec().sites.iter().map(|s| s.max_rank()).collect();
    model.act(
        ObsBatch { global: venv.obs_global(), sites: venv.obs_sites(), n_envs: ne, n_sites: l },
        BudgetContext {
            unit_cost: &venv.spec().unit_cost,
            budgets: &budgets,
            dims: Some(&dims),
            cost_coef: Some(venv.spec().preset.reward.cost_coef),
        },
        beliefs,
        mode,
    )
}

/// One vine branch ([`PpoConfig::skip_vine`]): `venv` (a copy taken before this round's decision)
/// plays this round's `first` decision (skip, the greedy plan, or the prior alone's decision),
/// then the model's greedy decisions until each environment's episode ends. Returns each
/// environment's discounted return from this round on, in the environments' own reward units.
fn vine_branch(model: &PolicyModel, mut venv: VecEnv, mut beliefs: Vec<Belief>, first: Branch, gamma: f64) -> Vec<f64> {
    let ne = venv.n_envs();
    let first = vec![first; ne];
    let (mut ret, mut alive, mut discount) = (vec![0f64; ne], vec![true; ne], 1.0);
    let mut mode = ActMode::Branch(&first);
    while alive.iter().any(|&a| a) {
        let d = act_on(model, &venv, &mut beliefs, mode);
        mode = ActMode::Greedy;
        venv.step_indices_skipping(&d.executed, &d.skip)
            .expect("the greedy policy emits in-range indices and skips only where allowed");
        for e in 0..ne {
            if alive[e] {
                ret[e] += discount * venv.rewards()[e] as f64;
                alive[e] = !venv.dones()[e];
            }
        }
        discount *= gamma;
    }
    ret
}

impl Twins {
    /// The reference policy's greedy round on every twin: their (rewards, site rewards).
    fn step(&mut self, model: &PolicyModel) -> (Vec<f32>, Vec<f32>) {
        let d = act_on(model, &self.venv, &mut self.beliefs, ActMode::Greedy);
        self.venv
            .step_indices_skipping(&d.executed, &d.skip)
            .expect("the reference policy emits in-range indices and skips only where allowed");
        (self.venv.rewards().to_vec(), self.venv.site_rewards().to_vec())
    }
}

/// Environments per group when training on a distribution: 8 draws in flight with the default
/// 32 environments, so every rollout mixes several environments, and each draw is seen on a few
/// episodes at once.
pub const ENVS_PER_DRAW: usize = 4;

/// What one environment's decision at one step left for the update.
struct StepRecord {
    n_sites: usize,
    global: Vec<f32>,
    sites: Vec<f32>,
    actions: Vec<u8>,
    logp: Vec<f32>,
    feasible: Vec<bool>,
    offset: Vec<f32>,
    prior: Vec<f32>,
    values: Vec<f32>,
    site_rewards: Vec<f32>,
    reward: f32,
    done: bool,
    /// Which episode of this rollout the step belongs to (numbered per rollout).
    episode: usize,
    /// Each site's current rank index.
    current: Vec<u8>,
    /// Each rank's relative cost (`model::rank_costs`), with `net.price`; empty otherwise.
    rank_costs: Vec<f32>,
    /// (taken, log-prob, prior margin, allowed), with a skip head.
    skip: Option<(f32, f32, f32, f32)>,
    /// With `ppo.skip_vine`, on a branched state where skipping is allowed: the taken skip
    /// decision's vine advantage ([`ppo::vine_advantage`]).
    vine: Option<f32>,
    /// With `net.defer`, on a branched state: what the defer head reads and Δ = Q(s, prior) −
    /// Q(s, learned greedy), in the rewards' units.
    defer: Option<(DeferInputs, f32)>,
    /// The oracle's rank index per site and whether it skips, with a teacher.
    teacher: Option<(Vec<u8>, bool)>,
}

/// Serializable state of one [`EnvGroup`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupState {
    draw: Option<u64>,
    venv: VecEnvSnapshot,
    #[serde(default)]
    beliefs: Vec<Belief>,
    /// The reference twins, with `ppo.reference_rollout`.
    #[serde(default)]
    reference: Option<TwinsState>,
}

/// Serializable state of a group's [`Twins`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TwinsState {
    venv: VecEnvSnapshot,
    beliefs: Vec<Belief>,
}

/// Serializable resume state (goes into the checkpoint's `state`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResumeState {
    iteration: usize,
    global_step: u64,
    rng: ChaCha8Rng,
    groups: Vec<GroupState>,
    draws: u64,
    adam_step: i64,
    ddim_adam_step: i64,
    #[serde(default)]
    defer_adam_step: i64,
    replay_len: usize,
    replay_pos: usize,
    ddim_active: bool,
    episode_ranks_env0: Vec<u32>,
}

/// The JSON `config` of a policy checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// The environment preset trained on (complete, so evaluation can rebuild it); with a
    /// distribution, its first validation draw.
    pub env_preset: EnvPreset,
    /// The distribution trained on, when not a single preset.
    #[serde(default)]
    pub env_distribution: Option<EnvDistribution>,
    /// The policy preset.
    pub policy_preset: PolicyPreset,
    /// Observation/action schema.
    pub schema: Schema,
    /// Planned environment steps.
    pub total_steps: u64,
    /// Seed of the run.
    pub seed: u64,
}

impl CheckpointConfig {
    /// Reads a checkpoint's `config` and checks it exactly like fresh input: the stored presets
    /// pass the same range checks as preset files (a hand-edited `checkpoint.json` is input too).
    pub fn from_json(config: &serde_json::Value) -> Result<CheckpointConfig, PolicyError> {
        let cfg: CheckpointConfig = serde_json::from_value(config.clone())
            .map_err(|e| PolicyError::Checkpoint(format!("checkpoint config: {e}")))?;
        for (key, violations) in [
            ("config.env_preset", violations(&cfg.env_preset)),
            ("config.policy_preset", violations(&cfg.policy_preset)),
        ] {
            if !violations.is_empty() {
                let list: Vec<String> = violations.iter().map(|v| v.to_string()).collect();
                return Err(PolicyError::Checkpoint(format!("{key}: {}", list.join("; "))));
            }
        }
        if cfg.total_steps == 0 {
            return Err(PolicyError::Checkpoint("key `config.total_steps` = 0: allowed: an integer >= 1".into()));
        }
        Ok(cfg)
    }
}

/// Every range violation of a preset.
fn violations(p: &dyn rankpilot_config::Validate) -> Vec<rankpilot_config::Violation> {
    let mut v = rankpilot_config::Violations::default();
    p.validate(&mut v);
    v.into_vec()
}

impl Trainer {
    /// A new run on one preset: fresh weights (seeded by `seed`), `ppo.num_envs` environments.
    pub fn new(
        env_preset: &EnvPreset,
        preset: &PolicyPreset,
        total_steps: u64,
        seed: u64,
        device: Device,
    ) -> Result<Self, PolicyError> {
        Self::build(env_preset, None, preset, total_steps, seed, device)
    }

    /// A new run on a distribution: groups of [`ENVS_PER_DRAW`] environments, each drawing a
    /// new preset from `distribution` for every episode (draw seeds from the run's seed).
    /// `validation` is the preset reported as the run's `env_preset`.
    pub fn with_distribution(
        distribution: &EnvDistribution,
        validation: &EnvPreset,
        preset: &PolicyPreset,
        total_steps: u64,
        seed: u64,
        device: Device,
    ) -> Result<Self, PolicyError> {
        Self::build(validation, Some(distribution), preset, total_steps, seed, device)
    }

    fn build(
        env_preset: &EnvPreset,
        distribution: Option<&EnvDistribution>,
        preset: &PolicyPreset,
        total_steps: u64,
        seed: u64,
        device: Device,
    ) -> Result<Self, PolicyError> {
        let spec: Arc<EnvSpec> = EnvSpec::new(env_preset)?;
        // A skipped round saves nothing under a fixed parameter budget (the adapter exists
        // whether or not the round is played): no skip head when training only there. On a
        // distribution the head is masked per state instead.
        let mut preset = preset.clone();
        if distribution.is_none() && spec.resource.kind() == envs::presets::ResourceKind::Budget {
            preset.ppo.net.skip = false;
        }
        let preset = &preset;
        let ranks = spec.rank_set.ranks().to_vec();
        let model = {
            // Initial weights come from libtorch's global generator: seed it and draw the
            // weights under one lock, so trainers created on several threads stay reproducible.
            static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
            let _guard = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
            tch::manual_seed(seed as i64);
            PolicyModel::with_prior(device, &ranks, preset.ppo.net, preset.ddim.clone(), &preset.prior)
        };
        // The reference policy is the untrained one: with a prior its residual's last layer is
        // zero, so it plays the prior alone, whatever its hidden layers drew.
        let reference_model = preset
            .ppo
            .reference_rollout
            .then(|| PolicyModel::with_prior(device, &ranks, preset.ppo.net, preset.ddim.clone(), &preset.prior));
        let opt = Adam::new(&model.vs, "net.", preset.ppo.learning_rate, preset.ppo.adam_eps);
        let ddim_opt = preset.ddim.enabled.then(|| Adam::new(&model.vs, "ddim.", preset.ddim.learning_rate, 1e-8));
        let replay = preset.ddim.enabled.then(|| Replay::new(preset.ddim.replay_capacity));
        let defer_opt = model
            .defer
            .is_some()
            .then(|| Adam::new(&model.vs, "defer.", preset.ppo.defer_learning_rate, preset.ppo.adam_eps));
        let mut t = Trainer {
            model,
            preset: preset.clone(),
            env_preset: env_preset.clone(),
            total_steps,
            seed,
            distribution: distribution.cloned(),
            groups: Vec::new(),
            draws: 0,
            opt,
            ddim_opt,
            defer_opt,
            replay,
            rng: ChaCha8Rng::seed_from_u64(envs::derive_seed(seed, 2)),
            iteration: 0,
            global_step: 0,
            episode_ranks_env0: Vec::new(),
            reference_model,
        };
        let n = preset.ppo.num_envs;
        let twins = t.reference_model.is_some();
        match distribution {
            None => {
                let venv = VecEnv::from_spec(spec.clone(), n, envs::derive_seed(seed, 1));
                let w = reward_weight(&spec, envs::derive_seed(seed, 4), preset.ppo.reward_per_gap)?;
                t.groups.push(EnvGroup::new(venv, None, twins, w))
            }
            Some(_) => {
                for g in 0..n.div_ceil(ENVS_PER_DRAW) {
                    let size = ENVS_PER_DRAW.min(n - g * ENVS_PER_DRAW);
                    let group = t.draw_group(size)?;
                    t.groups.push(group);
                }
            }
        }
        // Every preset's rank set must be the policy's.
        for g in &t.groups {
            if g.venv.spec().rank_set.ranks() != ranks.as_slice() {
                return Err(PolicyError::Incompatible(format!(
                    "draw `{}` uses ranks {:?}, the policy {:?}",
                    g.venv.spec().preset.name,
                    g.venv.spec().rank_set.ranks(),
                    ranks
                )));
            }
        }
        Ok(t)
    }

    /// The seed of draw number `i` of this run (a stream of its own, disjoint from the suites').
    fn draw_seed(&self, i: u64) -> u64 {
        envs::derive_seed(envs::derive_seed(self.seed, 3), i)
    }

    /// A group of `size` environments of the next draw.
    fn draw_group(&mut self, size: usize) -> Result<EnvGroup, PolicyError> {
        let dist = self.distribution.as_ref().expect("draws only on a distribution");
        let draw = self.draw_seed(self.draws);
        self.draws += 1;
        let spec = EnvSpec::new(&dist.draw(draw)?)?;
        let twins = self.reference_model.is_some();
        // The gap is measured on a stream of its own (1 is the training episodes').
        let w = reward_weight(&spec, envs::derive_seed(draw, 2), self.preset.ppo.reward_per_gap)?;
        Ok(EnvGroup::new(VecEnv::from_spec(spec, size, envs::derive_seed(draw, 1)), Some(draw), twins, w))
    }

    /// Number of sites of the first group's environment (the training preset's without a
    /// distribution).
    pub fn n_sites(&self) -> usize {
        self.groups[0].venv.n_sites()
    }

    /// Iterations the run will take in total.
    pub fn total_iterations(&self) -> usize {
        let per = (self.preset.ppo.num_envs * self.preset.ppo.num_steps) as u64;
        self.total_steps.div_ceil(per).max(1) as usize
    }

    /// True when the planned number of environment steps is done.
    pub fn finished(&self) -> bool {
        self.iteration >= self.total_iterations()
    }

    /// One PPO iteration (rollout + update, then the DDIM update).
    ///
    /// Each group of environments acts and steps on its own sites; the rollout is then laid out
    /// as `[T, N, L]` with L the most sites any step had, padding sites masked out of every loss
    /// (reward 0, value 0, all ranks feasible). With a distribution a group whose episodes ended
    /// draws its next preset before the next step.
    pub fn iterate(&mut self) -> IterationStats {
        let cfg = self.preset.ppo.at(self.iteration as f64 / self.total_iterations() as f64);
        let (n, k) = (cfg.num_envs, self.model.ranks.len());
        let t_len = cfg.num_steps;
        // The network's input widths: the observation's features, plus the estimates.
        let (g_dim, s_dim) = self.model.input_dims();
        let frac = 1.0 - self.iteration as f64 / self.total_iterations() as f64;
        let lr = if cfg.anneal_lr { cfg.learning_rate * frac } else { cfg.learning_rate };
        let has_skip = self.model.net.has_skip();
        let has_prior = self.model.prior.is_some();
        let has_price = self.model.net.has_price();
        let teacher_weight = cfg.teacher_weight(self.iteration as f64 / self.total_iterations() as f64);
        let has_teacher = teacher_weight > 0.0;
        let ddim_oracle = self.replay.is_some() && self.preset.ddim.target == ddim::DdimTarget::Oracle;
        let (mut agree, mut agree_n) = (0usize, 0usize);
        let scale = cfg.reward_scale as f32;
        let mut stats = IterationStats::default();
        let t_start = std::time::Instant::now();
        // One record per (step, environment), sites of its own count; padded after the rollout.
        let mut records: Vec<StepRecord> = Vec::with_capacity(t_len * n);
        // Each environment's episode in this rollout, numbered as they start.
        let mut episode_of: Vec<usize> = (0..n).collect();
        let mut next_episode = n;
        let (mut trimmed, mut decisions) = (0usize, 0usize);
        let (mut price_sum, mut price_n) = (0f64, 0usize);
        let (mut reward_sum, mut over_reference) = (0f64, 0f64);
        let (mut vine_n, mut vine_skip_better) = (0usize, 0usize);
        let (mut defer_n, mut defer_prior_better, mut defer_branched, mut defer_taken) =
            (0usize, 0usize, 0usize, 0usize);

        for _ in 0..t_len {
            let mut env_base = 0;
            let mut last_ranks = Vec::new();
            for gi in 0..self.groups.len() {
                let EnvGroup { venv, beliefs, reference, reward_weight, .. } = &mut self.groups[gi];
                let weighted = scale * *reward_weight;
                let (ne, l) = (venv.n_envs(), venv.n_sites());
                // Running statistics see every observation as it arrives (CleanRL's wrapper order).
                self.model.norm.global.update(venv.obs_global());
                self.model.norm.site.update(venv.obs_sites());
                let kappa =
                    if has_price { model::rank_costs(&venv.spec().unit_cost, &self.model.ranks) } else { Vec::new() };
                // Vine branches: `skip_vine` rounds per episode, at random, are branched before
                // the decision (the copies see this observation as the decision does).
                let branch = (cfg.skip_vine > 0.0
                    && self.rng.random::<f64>() < cfg.skip_vine / venv.spec().preset.rounds as f64)
                    .then(|| (venv.clone(), beliefs.to_vec()));
                let d = act_on(&self.model, venv, beliefs, ActMode::Sample(&mut self.rng));
                let mut vine: Vec<Option<f32>> = vec![None; ne];
                let mut defer: Vec<Option<(DeferInputs, f32)>> = vec![None; ne];
                if let Some((v0, b0)) = branch {
                    let q_play = vine_branch(&self.model, v0.clone(), b0.clone(), Branch::Play, cfg.gamma);
                    // A group shares one preset: skipping is allowed in all its environments or none.
                    let q_skip = (has_skip && d.skip_allowed.iter().any(|&a| a))
                        .then(|| vine_branch(&self.model, v0.clone(), b0.clone(), Branch::Skip, cfg.gamma));
                    if let Some(q_skip) = &q_skip {
                        for e in (0..ne).filter(|&e| d.skip_allowed[e]) {
                            let (q_taken, q_other) =
                                if d.skip[e] { (q_skip[e], q_play[e]) } else { (q_play[e], q_skip[e]) };
                            vine_n += 1;
                            vine_skip_better += (q_skip[e] > q_play[e]) as usize;
                            let a = ppo::vine_advantage((d.skip_logp[e] as f64).exp(), q_taken, q_other);
                            vine[e] = Some((a * weighted as f64) as f32);
                        }
                    }
                    // The defer head compares the prior alone's decision with the learned greedy
                    // one, which skips or plays: one of the branches above.
                    if self.model.defer.is_some() {
                        let greedy = act_on(&self.model, &v0, &mut b0.clone(), ActMode::Greedy);
                        let q_prior = vine_branch(&self.model, v0, b0, Branch::Prior, cfg.gamma);
                        for (e, inputs) in greedy.defer_inputs.iter().enumerate() {
                            let q_learned = match &q_skip {
                                Some(q) if inputs.learned_skips > 0.5 => q[e],
                                _ => q_play[e],
                            };
                            let delta = ((q_prior[e] - q_learned) * weighted as f64) as f32;
                            defer_branched += 1;
                            defer_taken += greedy.deferred[e] as usize;
                            defer_n += (delta != 0.0) as usize;
                            defer_prior_better += (delta > 0.0) as usize;
                            defer[e] = Some((*inputs, delta));
                        }
                    }
                }
                // The teacher labels the states the policy visits, before the step leaves them.
                let teacher: Vec<(Vec<u8>, bool)> = if has_teacher || ddim_oracle {
                    (0..ne)
                        .map(|e| {
                            let (plan, plays) = venv.oracle_decision(e);
                            let rs = &venv.spec().rank_set;
                            let idx =
                                plan.iter().map(|&r| rs.index_of(r).expect("the oracle plans from the set") as u8);
                            (idx.collect(), !plays)
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                for (e, (plan, _)) in teacher.iter().enumerate().filter(|(e, _)| has_teacher && !d.skip[*e]) {
                    agree += plan.iter().zip(&d.coarse[e * l..(e + 1) * l]).filter(|(a, b)| a == b).count();
                    agree_n += l;
                }
                trimmed += d.trimmed;
                price_sum += d.spend_price.iter().map(|&p| p as f64).sum::<f64>();
                price_n += d.spend_price.len();
                decisions += d.skip.iter().filter(|&&s| !s).count() * l;
                venv.step_indices_skipping(&d.executed, &d.skip)
                    .expect("the policy emits in-range indices of the right length, and skips only where allowed");
                let rewards = venv.rewards();
                // The twins' round: the rewards PPO sees are measured against theirs.
                let (ref_rewards, ref_site_rewards) = match (reference.as_mut(), self.reference_model.as_ref()) {
                    (Some(twins), Some(m)) => {
                        let r = twins.step(m);
                        debug_assert_eq!(twins.venv.dones(), venv.dones(), "twins end their episodes together");
                        r
                    }
                    _ => (vec![0.0; ne], vec![0.0; ne * l]),
                };
                reward_sum += rewards.iter().map(|&r| (r * scale) as f64).sum::<f64>();
                if reference.is_some() {
                    over_reference += (0..ne).map(|e| (rewards[e] - ref_rewards[e]) as f64).sum::<f64>();
                }
                if let Some(replay) = self.replay.as_mut() {
                    for e in 0..ne {
                        let enc = |v: &[u8]| -> Vec<f32> { v.iter().map(|&j| ddim::encode(j as usize, k)).collect() };
                        // The observation's own features: the leading columns of each row (the
                        // refiner does not read the estimates).
                        let sites: Vec<f32> = (e * l..(e + 1) * l)
                            .flat_map(|i| d.sites[i * s_dim..i * s_dim + SITE_FEATURES].iter().copied())
                            .collect();
                        replay.push(
                            &d.global[e * g_dim..e * g_dim + GLOBAL_FEATURES],
                            &sites,
                            &enc(&d.coarse[e * l..(e + 1) * l]),
                            &enc(match teacher.get(e) {
                                Some((plan, _)) if ddim_oracle => plan.as_slice(),
                                _ => &d.executed[e * l..(e + 1) * l],
                            }),
                            rewards[e] * scale,
                        );
                    }
                }
                for e in 0..ne {
                    let sites_of = e * l..(e + 1) * l;
                    let rows = e * l * k..(e + 1) * l * k;
                    let episode = episode_of[env_base + e];
                    if venv.dones()[e] {
                        episode_of[env_base + e] = next_episode;
                        next_episode += 1;
                    }
                    records.push(StepRecord {
                        n_sites: l,
                        global: d.global[e * g_dim..(e + 1) * g_dim].to_vec(),
                        sites: d.sites[e * l * s_dim..(e + 1) * l * s_dim].to_vec(),
                        actions: d.coarse[sites_of.clone()].to_vec(),
                        logp: d.logp[sites_of.clone()].to_vec(),
                        feasible: d.feasible[rows.clone()].to_vec(),
                        offset: d.offset[rows.clone()].to_vec(),
                        prior: if has_prior { d.prior[rows].to_vec() } else { Vec::new() },
                        values: d.values[sites_of.clone()].to_vec(),
                        site_rewards: venv.site_rewards()[sites_of.clone()]
                            .iter()
                            .zip(&ref_site_rewards[sites_of.clone()])
                            .map(|(&r, &r_ref)| (r - r_ref) * weighted)
                            .collect(),
                        reward: (rewards[e] - ref_rewards[e]) * weighted,
                        done: venv.dones()[e],
                        episode,
                        current: d.current[sites_of.clone()].to_vec(),
                        rank_costs: kappa.clone(),
                        skip: has_skip.then(|| {
                            (
                                d.skip[e] as u8 as f32,
                                d.skip_logp[e],
                                d.skip_margin.get(e).copied().unwrap_or(0.0),
                                d.skip_allowed[e] as u8 as f32,
                            )
                        }),
                        teacher: if has_teacher { teacher.get(e).cloned() } else { None },
                        vine: vine[e],
                        defer: defer[e],
                    });
                }
                if gi == 0 {
                    self.episode_ranks_env0.extend(d.executed[..l].iter().map(|&j| self.model.ranks[j as usize]));
                    if venv.dones()[0] {
                        let rounds = self.episode_ranks_env0.len() / l.max(1);
                        stats.episode_ranks = Some((rounds, std::mem::take(&mut self.episode_ranks_env0)));
                    }
                }
                stats.episodes.extend_from_slice(venv.finished());
                env_base += ne;
                last_ranks.extend(d.executed.iter().map(|&j| self.model.ranks[j as usize]));
                // One preset, one horizon: a group's episodes end together; then the next draw.
                if self.distribution.is_some() && venv.dones()[0] {
                    let group = self.draw_group(ne).expect("draws of a checked distribution form valid presets");
                    self.groups[gi] = group;
                }
            }
            stats.last_ranks = last_ranks;
        }

        // Records are step-major in group order, so index t·N + n is environment n at step t.
        // A group redrawn at the last step may have more sites than any record: its bootstrap
        // values need room too.
        let l =
            records.iter().map(|r| r.n_sites).chain(self.groups.iter().map(|g| g.venv.n_sites())).max().unwrap_or(1);
        let b = t_len * n;
        let mut buf_g = Vec::with_capacity(b * g_dim);
        let mut buf_s = vec![0f32; b * l * s_dim];
        let mut buf_mask = vec![0f32; b * l];
        let mut buf_a = vec![0i64; b * l];
        let mut buf_current = vec![0i64; b * l];
        let mut buf_logp = vec![0f32; b * l];
        let mut buf_feasible = vec![true; b * l * k];
        let mut buf_offset = vec![0f32; b * l * k];
        let mut buf_prior = vec![0f32; if has_prior { b * l * k } else { 0 }];
        let mut buf_kappa = vec![0f32; if has_price { b * l * k } else { 0 }];
        let (mut buf_v, mut buf_r, mut buf_done) = (Vec::new(), Vec::new(), Vec::new());
        let (mut skip_taken, mut skip_logp, mut skip_margin, mut skip_allowed) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut vine_adv, mut vine_branched) = (Vec::new(), Vec::new());
        let mut buf_teacher = vec![0i64; if has_teacher { b * l } else { 0 }];
        let mut teacher_skip = Vec::new();
        for (i, r) in records.iter().enumerate() {
            let m = r.n_sites;
            buf_g.extend_from_slice(&r.global);
            buf_s[i * l * s_dim..(i * l + m) * s_dim].copy_from_slice(&r.sites);
            buf_mask[i * l..i * l + m].iter_mut().for_each(|x| *x = 1.0);
            buf_a[i * l..i * l + m].iter_mut().zip(&r.actions).for_each(|(a, &j)| *a = j as i64);
            buf_current[i * l..i * l + m].iter_mut().zip(&r.current).for_each(|(a, &j)| *a = j as i64);
            buf_logp[i * l..i * l + m].copy_from_slice(&r.logp);
            buf_feasible[i * l * k..(i * l + m) * k].copy_from_slice(&r.feasible);
            buf_offset[i * l * k..(i * l + m) * k].copy_from_slice(&r.offset);
            if has_prior {
                buf_prior[i * l * k..(i * l + m) * k].copy_from_slice(&r.prior);
            }
            if has_price {
                buf_kappa[i * l * k..(i * l + m) * k].copy_from_slice(&r.rank_costs);
            }
            let done = if r.done { 1.0f32 } else { 0.0 };
            match cfg.credit {
                Credit::PerSite => {
                    buf_v.extend(r.values.iter().copied().chain(std::iter::repeat_n(0.0, l - m)));
                    buf_r.extend(r.site_rewards.iter().copied().chain(std::iter::repeat_n(0.0, l - m)));
                    buf_done.extend(std::iter::repeat_n(done, l));
                }
                Credit::Shared => {
                    buf_v.push(r.values.iter().sum::<f32>());
                    buf_r.push(r.reward);
                    buf_done.push(done);
                }
            }
            if let Some((plan, skips)) = &r.teacher {
                buf_teacher[i * l..i * l + m].iter_mut().zip(plan).for_each(|(a, &j)| *a = j as i64);
                teacher_skip.push(*skips as u8 as f32);
            }
            if let Some((s, lp, mg, al)) = r.skip {
                skip_taken.push(s);
                skip_logp.push(lp);
                skip_margin.push(mg);
                skip_allowed.push(al);
                vine_adv.push(r.vine.unwrap_or(0.0));
                vine_branched.push(r.vine.is_some() as u8 as f32);
            }
        }

        // Bootstrap values of the observations after the rollout (statistics not updated here).
        let mut next_site_values = Vec::with_capacity(n * l);
        for g in &self.groups {
            let (ne, m) = (g.venv.n_envs(), g.venv.n_sites());
            // The estimates of these observations, from copies of the beliefs: the next
            // iteration's decisions add the same observations to the real ones.
            let est = if self.model.estimates {
                let budgets: Vec<f64> = (0..ne).map(|i| g.venv.context(i).conservative_budget).collect();
                let dims: Vec<u32> = g.venv.spec().sites.iter().map(|s| s.max_rank()).collect();
                self.model.prior_output(
                    ObsBatch { global: g.venv.obs_global(), sites: g.venv.obs_sites(), n_envs: ne, n_sites: m },
                    BudgetContext {
                        unit_cost: &g.venv.spec().unit_cost,
                        budgets: &budgets,
                        dims: Some(&dims),
                        cost_coef: Some(g.venv.spec().preset.reward.cost_coef),
                    },
                    &mut g.beliefs.clone(),
                )
            } else {
                Default::default()
            };
            let (gt, st, mask, _, _) = self.model.tensors(g.venv.obs_global(), g.venv.obs_sites(), ne, m, &est);
            let v: Vec<f32> =
                Vec::try_from(tch::no_grad(|| self.model.net.forward(&gt, &st, &mask).site_values).flatten(0, -1))
                    .expect("f32");
            for e in 0..ne {
                next_site_values.extend(v[e * m..(e + 1) * m].iter().copied().chain(std::iter::repeat_n(0.0, l - m)));
            }
        }
        // Per-site credit runs GAE over n × l independent reward streams laid out [T, n, l].
        let (streams, next_value): (usize, Vec<f32>) = match cfg.credit {
            Credit::PerSite => (n * l, next_site_values),
            Credit::Shared => (n, next_site_values.chunks_exact(l).map(|v| v.iter().sum()).collect()),
        };
        let (mut adv, ret) = ppo::gae(&buf_r, &buf_v, &buf_done, &next_value, streams, cfg.gamma, cfg.gae_lambda);
        if cfg.norm_adv_per_episode {
            let episode: Vec<usize> = records.iter().map(|r| r.episode).collect();
            match cfg.credit {
                Credit::PerSite => ppo::normalize_per_episode(&mut adv, &buf_mask, &episode, l),
                Credit::Shared => ppo::normalize_per_episode(&mut adv, &vec![1.0; b], &episode, 1),
            }
        }
        // The environments' own reward (the records hold it relative to the twins').
        stats.mean_reward = reward_sum / b as f64;
        stats.reward_over_reference = if self.reference_model.is_some() { over_reference / b as f64 } else { f64::NAN };
        stats.trimmed_share = if decisions > 0 { trimmed as f64 / decisions as f64 } else { 0.0 };
        stats.spend_price = if price_n > 0 { price_sum / price_n as f64 } else { f64::NAN };
        stats.teacher_agreement = if agree_n > 0 { agree as f64 / agree_n as f64 } else { f64::NAN };
        stats.teacher_weight = teacher_weight;
        stats.vine_states = vine_n;
        stats.vine_skip_better = if vine_n > 0 { vine_skip_better as f64 / vine_n as f64 } else { f64::NAN };
        stats.defer_states = defer_n;
        stats.defer_share = if defer_branched > 0 { defer_taken as f64 / defer_branched as f64 } else { f64::NAN };
        stats.defer_prior_better = if defer_n > 0 { defer_prior_better as f64 / defer_n as f64 } else { f64::NAN };

        stats.rollout_s = t_start.elapsed().as_secs_f64();
        let t_update = std::time::Instant::now();
        let dev = self.model.device();
        let (bi, li, ki) = (b as i64, l as i64, k as i64);
        let batch = Batch {
            global: Tensor::from_slice(&buf_g).view([bi, g_dim as i64]).to_device(dev),
            sites: Tensor::from_slice(&buf_s).view([bi, li, s_dim as i64]).to_device(dev),
            mask: Tensor::from_slice(&buf_mask).view([bi, li]).to_device(dev),
            actions: Tensor::from_slice(&buf_a).view([bi, li]).to_device(dev),
            logp: Tensor::from_slice(&buf_logp).view([bi, li]).to_device(dev),
            values: Tensor::from_slice(&buf_v).view(value_shape(cfg.credit, bi, l).as_slice()).to_device(dev),
            advantages: Tensor::from_slice(&adv).view(value_shape(cfg.credit, bi, l).as_slice()).to_device(dev),
            returns: Tensor::from_slice(&ret).view(value_shape(cfg.credit, bi, l).as_slice()).to_device(dev),
            prior: has_prior.then(|| Tensor::from_slice(&buf_prior).view([bi, li, ki]).to_device(dev)),
            feasible: Some(Tensor::from_slice(&buf_feasible).view([bi, li, ki]).to_device(dev)),
            offset: Some(Tensor::from_slice(&buf_offset).view([bi, li, ki]).to_device(dev)),
            current: self
                .model
                .net
                .needs_current()
                .then(|| Tensor::from_slice(&buf_current).view([bi, li]).to_device(dev)),
            rank_costs: has_price.then(|| Tensor::from_slice(&buf_kappa).view([bi, li, ki]).to_device(dev)),
            teacher: has_teacher.then(|| ppo::TeacherBatch {
                ranks: Tensor::from_slice(&buf_teacher).view([bi, li]).to_device(dev),
                skip: Tensor::from_slice(&teacher_skip).to_device(dev),
                weight: teacher_weight,
            }),
            skip: has_skip.then(|| ppo::SkipBatch {
                taken: Tensor::from_slice(&skip_taken).to_device(dev),
                logp: Tensor::from_slice(&skip_logp).to_device(dev),
                margin: has_prior.then(|| Tensor::from_slice(&skip_margin).to_device(dev)),
                allowed: Tensor::from_slice(&skip_allowed).to_device(dev),
                vine: (cfg.skip_vine > 0.0).then(|| {
                    (Tensor::from_slice(&vine_adv).to_device(dev), Tensor::from_slice(&vine_branched).to_device(dev))
                }),
            }),
        };
        let rng = &mut self.rng;
        stats.update = ppo::update(&cfg, &self.model.net, &self.model.vs, &mut self.opt, &batch, lr, |len| {
            let mut p: Vec<i64> = (0..len as i64).collect();
            p.shuffle(rng);
            p
        });
        stats.ddim_loss = self.ddim_update();
        stats.defer_loss = self.defer_update(
            &records,
            &batch,
            if cfg.anneal_lr { cfg.defer_learning_rate * frac } else { cfg.defer_learning_rate },
        );
        stats.update_s = t_update.elapsed().as_secs_f64();

        self.iteration += 1;
        self.global_step += b as u64;
        stats.iteration = self.iteration;
        stats.global_step = self.global_step;
        stats
    }

    /// Trains the defer head on this rollout's branched states ([`ppo::defer_update`]), their
    /// context computed by the network after PPO's update. NaN without a defer head.
    fn defer_update(&mut self, records: &[StepRecord], batch: &Batch, lr: f64) -> f64 {
        let (Some(head), Some(opt)) = (self.model.defer.as_ref(), self.defer_opt.as_mut()) else {
            return f64::NAN;
        };
        let rows: Vec<i64> = (0..records.len() as i64).filter(|&i| records[i as usize].defer.is_some()).collect();
        if rows.is_empty() {
            return f64::NAN;
        }
        let (inputs, delta): (Vec<f32>, Vec<f32>) = rows
            .iter()
            .filter_map(|&i| records[i as usize].defer)
            .map(|(inputs, delta)| (inputs.row(), delta))
            .fold((Vec::new(), Vec::new()), |(mut x, mut d), (row, delta)| {
                x.extend_from_slice(&row);
                d.push(delta);
                (x, d)
            });
        let dev = self.model.device();
        let idx = Tensor::from_slice(&rows).to_device(dev);
        let context = tch::no_grad(|| {
            let sel = |t: &Tensor| t.index_select(0, &idx);
            self.model.net.forward(&sel(&batch.global), &sel(&batch.sites), &sel(&batch.mask)).context
        });
        let defer_batch = ppo::DeferBatch {
            context,
            inputs: Tensor::from_slice(&inputs).view([rows.len() as i64, DeferInputs::LEN as i64]).to_device(dev),
            delta: Tensor::from_slice(&delta).to_device(dev),
        };
        let rng = &mut self.rng;
        ppo::defer_update(&self.preset.ppo, head, opt, &defer_batch, lr, |len| {
            let mut p: Vec<i64> = (0..len as i64).collect();
            p.shuffle(rng);
            p
        })
    }

    /// Alternating DDIM step ([`ddim::update`]); DDIM starts refining after its first update.
    fn ddim_update(&mut self) -> f64 {
        let (Some(replay), Some(opt), Some(den)) =
            (self.replay.as_ref(), self.ddim_opt.as_mut(), self.model.denoiser.as_ref())
        else {
            return f64::NAN;
        };
        let dev = self.model.vs.device();
        let loss = ddim::update(den, opt, replay, &self.preset.ddim, &self.model.alpha_bar, &mut self.rng, dev);
        if loss.is_finite() {
            self.model.ddim_active = true;
        }
        loss
    }

    /// Everything a checkpoint holds: named tensors, the `config` JSON and the `state` JSON.
    pub fn checkpoint_parts(&self) -> (Vec<(String, Tensor)>, serde_json::Value, serde_json::Value) {
        let mut tensors = self.model.weights();
        tensors.extend(self.opt.state_tensors());
        if let Some(o) = &self.ddim_opt {
            tensors.extend(o.state_tensors().into_iter().map(|(n, t)| (format!("ddim_{n}"), t)));
        }
        if let Some(o) = &self.defer_opt {
            tensors.extend(o.state_tensors().into_iter().map(|(n, t)| (format!("defer_{n}"), t)));
        }
        if let Some(r) = &self.replay {
            tensors.extend(r.tensors());
        }
        let config = CheckpointConfig {
            env_preset: self.env_preset.clone(),
            env_distribution: self.distribution.clone(),
            policy_preset: self.preset.clone(),
            schema: Schema::current(&self.model.ranks),
            total_steps: self.total_steps,
            seed: self.seed,
        };
        let state = ResumeState {
            iteration: self.iteration,
            global_step: self.global_step,
            rng: self.rng.clone(),
            groups: self
                .groups
                .iter()
                .map(|g| GroupState {
                    draw: g.draw,
                    venv: g.venv.snapshot(),
                    beliefs: g.beliefs.clone(),
                    reference: g
                        .reference
                        .as_ref()
                        .map(|r| TwinsState { venv: r.venv.snapshot(), beliefs: r.beliefs.clone() }),
                })
                .collect(),
            draws: self.draws,
            adam_step: self.opt.step,
            ddim_adam_step: self.ddim_opt.as_ref().map_or(0, |o| o.step),
            defer_adam_step: self.defer_opt.as_ref().map_or(0, |o| o.step),
            replay_len: self.replay.as_ref().map_or(0, |r| r.len),
            replay_pos: self.replay.as_ref().map_or(0, |r| r.pos),
            ddim_active: self.model.ddim_active,
            episode_ranks_env0: self.episode_ranks_env0.clone(),
        };
        let state = serde_json::json!({ "normalizer": self.model.norm.to_json(), "trainer": state });
        (tensors, serde_json::to_value(config).expect("config serializes"), state)
    }

    /// Rebuilds a run from [`Trainer::checkpoint_parts`]; `total_steps` may extend the plan.
    pub fn restore(
        config: &serde_json::Value,
        state: &serde_json::Value,
        tensors: &[(String, Tensor)],
        total_steps: Option<u64>,
        device: Device,
    ) -> Result<Self, PolicyError> {
        let cfg = CheckpointConfig::from_json(config)?;
        let rs: ResumeState = serde_json::from_value(state.get("trainer").cloned().unwrap_or_default())
            .map_err(|e| PolicyError::Checkpoint(format!("checkpoint state: {e}")))?;
        let mut t = Trainer::build(
            &cfg.env_preset,
            cfg.env_distribution.as_ref(),
            &cfg.policy_preset,
            total_steps.unwrap_or(cfg.total_steps),
            cfg.seed,
            device,
        )?;
        cfg.schema.check_compatible(&Schema::current(&t.model.ranks))?;
        t.model.load_weights(tensors)?;
        t.model.norm =
            crate::normalize::ObsNormalizer::from_json(&state["normalizer"], GLOBAL_FEATURES, SITE_FEATURES)?;
        t.opt.load_state_tensors(tensors, rs.adam_step)?;
        if let Some(o) = t.ddim_opt.as_mut() {
            let renamed: Vec<(String, Tensor)> = tensors
                .iter()
                .filter_map(|(n, x)| n.strip_prefix("ddim_").map(|s| (s.to_string(), x.shallow_clone())))
                .collect();
            o.load_state_tensors(&renamed, rs.ddim_adam_step)?;
        }
        if let Some(o) = t.defer_opt.as_mut() {
            let renamed: Vec<(String, Tensor)> = tensors
                .iter()
                .filter_map(|(n, x)| n.strip_prefix("defer_").map(|s| (s.to_string(), x.shallow_clone())))
                .collect();
            o.load_state_tensors(&renamed, rs.defer_adam_step)?;
        }
        if let Some(r) = t.replay.as_mut() {
            r.load(tensors, rs.replay_len, rs.replay_pos)?;
        }
        let twins = t.reference_model.is_some();
        t.groups = rs
            .groups
            .into_iter()
            .map(|g| {
                let spec = match (g.draw, &cfg.env_distribution) {
                    (None, _) => EnvSpec::new(&cfg.env_preset)?,
                    (Some(d), Some(dist)) => EnvSpec::new(&dist.draw(d)?)?,
                    (Some(_), None) => {
                        return Err(PolicyError::Checkpoint(
                            "a group holds a draw but the run has no distribution".into(),
                        ));
                    }
                };
                let reference = match (g.reference, twins) {
                    (Some(r), true) if r.beliefs.len() == g.beliefs.len() => {
                        Some(Twins { venv: VecEnv::restore(spec.clone(), r.venv)?, beliefs: r.beliefs })
                    }
                    (None, false) => None,
                    _ => {
                        return Err(PolicyError::Checkpoint(
                            "state.trainer.groups: the reference twins do not match ppo.reference_rollout".into(),
                        ));
                    }
                };
                let seed = g.draw.map_or(envs::derive_seed(cfg.seed, 4), |d| envs::derive_seed(d, 2));
                let reward_weight = reward_weight(&spec, seed, cfg.policy_preset.ppo.reward_per_gap)?;
                let venv = VecEnv::restore(spec, g.venv)?;
                let beliefs =
                    if g.beliefs.len() == venv.n_envs() { g.beliefs } else { vec![Belief::new(); venv.n_envs()] };
                Ok(EnvGroup { venv, beliefs, draw: g.draw, reference, reward_weight })
            })
            .collect::<Result<Vec<_>, PolicyError>>()?;
        if t.groups.iter().map(|g| g.venv.n_envs()).sum::<usize>() != t.preset.ppo.num_envs {
            return Err(PolicyError::Checkpoint(
                "state.trainer.groups: environments do not add up to ppo.num_envs".into(),
            ));
        }
        t.draws = rs.draws;
        t.rng = rs.rng;
        t.iteration = rs.iteration;
        t.global_step = rs.global_step;
        t.model.ddim_active = rs.ddim_active;
        t.episode_ranks_env0 = rs.episode_ranks_env0;
        Ok(t)
    }
}

/// Shape of values/advantages/returns in a [`Batch`]: per site [B, L] or per state [B].
fn value_shape(credit: Credit, b: i64, l: usize) -> Vec<i64> {
    match credit {
        Credit::PerSite => vec![b, l as i64],
        Credit::Shared => vec![b],
    }
}

/// Loads a trained policy (greedy) from checkpoint parts, for evaluation and real runs.
pub fn policy_from_checkpoint(
    config: &serde_json::Value,
    state: &serde_json::Value,
    tensors: &[(String, Tensor)],
    device: Device,
) -> Result<(PolicyModel, CheckpointConfig), PolicyError> {
    let cfg = CheckpointConfig::from_json(config)?;
    let mut model = PolicyModel::with_prior(
        device,
        &cfg.schema.ranks,
        cfg.policy_preset.ppo.net,
        cfg.policy_preset.ddim.clone(),
        &cfg.policy_preset.prior,
    );
    model.load_weights(tensors)?;
    model.norm = crate::normalize::ObsNormalizer::from_json(&state["normalizer"], GLOBAL_FEATURES, SITE_FEATURES)?;
    model.ddim_active = state["trainer"]["ddim_active"].as_bool().unwrap_or(false);
    Ok((model, cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wireless preset at two layers and six rounds: episodes end within a few steps.
    fn small_env() -> EnvPreset {
        let text = envs::presets::embedded_text("wireless-rayleigh")
            .unwrap()
            .replace("layers = 8", "layers = 2")
            .replace("rounds = 20", "rounds = 6");
        envs::presets::from_toml(&text, "twins-test", None).unwrap()
    }

    #[test]
    fn reference_twins_face_the_learners_draws_whatever_it_plays() {
        // The reference rollout is a baseline only if the twin's reward depends on the
        // environment's draws alone: the learner plays other plans (here the largest rank
        // everywhere, which violates, and at times the reference's own plan); the twins must see
        // the same budgets every round and the same observations at every episode start, and the
        // reward difference must be exactly 0 where both played the same plan from the same state.
        let env = small_env();
        assert!(env.rounds == 6, "the test preset's horizon");
        let mut preset = load_preset("default").unwrap();
        preset.ppo.num_envs = 4;
        preset.ppo.reference_rollout = true;
        let mut t = Trainer::new(&env, &preset, 64, 5, Device::Cpu).unwrap();
        let model = t.reference_model.take().unwrap();
        let EnvGroup { venv, beliefs, reference, .. } = &mut t.groups[0];
        let twins = reference.as_mut().unwrap();
        let (ne, l) = (venv.n_envs(), venv.n_sites());
        let k = venv.spec().rank_set.len() as u8;
        let (mut starts, mut same_plan_rounds) = (0, 0);
        for round in 0..3 * env.rounds as usize {
            for e in 0..ne {
                let (a, b) = (venv.context(e), twins.venv.context(e));
                assert_eq!(a.estimated_budget, b.estimated_budget, "round {round}, env {e}: the budget draw");
            }
            if round % env.rounds as usize == 0 {
                assert_eq!(venv.obs_sites(), twins.venv.obs_sites(), "episode start {round}: the site draws");
                assert_eq!(venv.obs_global(), twins.venv.obs_global());
                starts += 1;
            }
            // Until the first divergence in an episode the learner copies the reference; after
            // it, it plays the largest rank everywhere.
            let copy = round % env.rounds as usize == 0;
            let plan = if copy {
                act_on(&model, venv, beliefs, ActMode::Greedy)
            } else {
                let mut d = act_on(&model, venv, beliefs, ActMode::Greedy);
                d.executed = vec![k - 1; ne * l];
                d.skip = vec![false; ne];
                d
            };
            venv.step_indices_skipping(&plan.executed, &plan.skip).unwrap();
            let (ref_rewards, ref_site_rewards) = twins.step(&model);
            assert_eq!(venv.dones(), twins.venv.dones(), "the twins end their episodes together");
            if copy {
                assert_eq!(venv.rewards(), ref_rewards.as_slice(), "round {round}: the same plan, the same reward");
                assert_eq!(venv.site_rewards(), ref_site_rewards.as_slice());
                same_plan_rounds += 1;
            } else {
                assert_ne!(venv.rewards(), ref_rewards.as_slice(), "round {round}: the violating plan costs");
            }
        }
        assert_eq!((starts, same_plan_rounds), (3, 3));
    }

    #[test]
    fn a_vine_branch_taking_the_greedy_decision_returns_the_greedy_rollouts_return() {
        // The branches are worth comparing only if they face the environment's own draws and
        // differ in the forced decision alone. From every round of an episode: where the greedy
        // policy itself skips (plays), the skipping (playing) branch's return is the greedy
        // rollout's, bit for bit; the other branch's differs.
        let env = small_env();
        let mut preset = load_preset("default").unwrap();
        preset.ppo.num_envs = 4;
        preset.ppo.skip_vine = 1.0;
        let mut t = Trainer::new(&env, &preset, 64, 5, Device::Cpu).unwrap();
        let gamma = preset.ppo.gamma;
        let model = &t.model;
        let EnvGroup { venv, beliefs, .. } = &mut t.groups[0];
        let ne = venv.n_envs();
        let (mut matched, mut differed) = ([0usize; 2], 0usize);
        for _round in 0..env.rounds {
            let (mut g_venv, mut g_beliefs) = (venv.clone(), beliefs.to_vec());
            let mut first_skip = None;
            let (mut greedy, mut alive, mut discount) = (vec![0f64; ne], vec![true; ne], 1.0);
            while alive.iter().any(|&a| a) {
                let d = act_on(model, &g_venv, &mut g_beliefs, ActMode::Greedy);
                first_skip.get_or_insert(d.skip.clone());
                g_venv.step_indices_skipping(&d.executed, &d.skip).unwrap();
                for e in 0..ne {
                    if alive[e] {
                        greedy[e] += discount * g_venv.rewards()[e] as f64;
                        alive[e] = !g_venv.dones()[e];
                    }
                }
                discount *= gamma;
            }
            let q_skip = vine_branch(model, venv.clone(), beliefs.to_vec(), Branch::Skip, gamma);
            let q_play = vine_branch(model, venv.clone(), beliefs.to_vec(), Branch::Play, gamma);
            for (e, &skips) in first_skip.unwrap().iter().enumerate() {
                let (same, other) = if skips { (q_skip[e], q_play[e]) } else { (q_play[e], q_skip[e]) };
                assert_eq!(same.to_bits(), greedy[e].to_bits(), "env {e}: the greedy decision's branch");
                matched[skips as usize] += 1;
                differed += (other != same) as usize;
            }
            let d = act_on(model, venv, beliefs, ActMode::Greedy);
            venv.step_indices_skipping(&d.executed, &d.skip).unwrap();
        }
        assert!(matched[0] > 0 && matched[1] > 0, "both decisions were the greedy one somewhere: {matched:?}");
        assert!(differed * 2 > matched.iter().sum::<usize>(), "the forced decision changes the return: {differed}");
    }

    /// Plays `a` and `b` greedily side by side for `rounds` rounds from copies of `group`'s
    /// state, handing each of `a`'s decisions to `check`: the rounds where both played the same
    /// decision for the same rewards, and the rounds played.
    fn play_twins(
        a: &PolicyModel,
        b: &PolicyModel,
        group: &EnvGroup,
        rounds: u32,
        mut check: impl FnMut(&model::Decision),
    ) -> (usize, usize) {
        let (mut a_venv, mut a_beliefs) = (group.venv.clone(), group.beliefs.to_vec());
        let (mut b_venv, mut b_beliefs) = (group.venv.clone(), group.beliefs.to_vec());
        let mut same = 0;
        for _ in 0..rounds {
            let da = act_on(a, &a_venv, &mut a_beliefs, ActMode::Greedy);
            let db = act_on(b, &b_venv, &mut b_beliefs, ActMode::Greedy);
            check(&da);
            a_venv.step_indices_skipping(&da.executed, &da.skip).unwrap();
            b_venv.step_indices_skipping(&db.executed, &db.skip).unwrap();
            same += (da.executed == db.executed && da.skip == db.skip && a_venv.rewards() == b_venv.rewards()) as usize;
        }
        (same, rounds as usize)
    }

    #[test]
    fn a_policy_that_defers_plays_its_prior_alone_and_the_prior_branch_is_that_play() {
        // Untrained, the residual is zero: the prior's branch returns what the greedy branch
        // does, bit for bit. With the residual moved, a head that always defers plays exactly
        // the prior alone's decisions (an untrained twin's) round after round, and one that never
        // defers plays others.
        let env = small_env();
        let mut preset = load_preset("default").unwrap();
        preset.ppo.num_envs = 4;
        preset.ppo.net.defer = true;
        // The moved weights below are the rank residual's, which this option would ignore.
        preset.ppo.net.prior_ranks = false;
        let gamma = preset.ppo.gamma;
        let t = Trainer::new(&env, &preset, 64, 5, Device::Cpu).unwrap();
        let prior_alone = Trainer::new(&env, &preset, 64, 5, Device::Cpu).unwrap().model;
        {
            let EnvGroup { venv, beliefs, .. } = &t.groups[0];
            let q_play = vine_branch(&t.model, venv.clone(), beliefs.to_vec(), Branch::Play, gamma);
            let q_prior = vine_branch(&t.model, venv.clone(), beliefs.to_vec(), Branch::Prior, gamma);
            let bits = |q: &[f64]| q.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&q_play), bits(&q_prior), "with the residual at zero the two branches are one");
        }
        let vars = t.model.vs.variables();
        tch::no_grad(|| {
            tch::manual_seed(3);
            let w = &vars["net.logits.weight"];
            w.shallow_clone().copy_(&(w.randn_like() * 0.05));
        });
        let played = |bias: f64| -> (usize, usize) {
            tch::no_grad(|| {
                let _ = vars["defer.out.bias"].shallow_clone().fill_(bias);
            });
            play_twins(&t.model, &prior_alone, &t.groups[0], env.rounds, |a| {
                assert!(a.deferred.iter().all(|&d| d == (bias > 0.0)), "the head decides alone: {:?}", a.deferred);
            })
        };
        let (same, rounds) = played(10.0);
        assert_eq!(same, rounds, "deferring, every round is the prior alone's");
        let (same, rounds) = played(-10.0);
        assert!(same < rounds, "the moved residual plays other rounds: {same} of {rounds} the same");
    }

    #[test]
    fn with_prior_ranks_the_greedy_plans_are_the_prior_alones_whatever_the_weights() {
        // Every weight of the network moved: with `net.prior_ranks` the plans stay the untrained
        // twin's (the prior alone's) round after round; without it the same weights play others.
        let plays_like_prior = |prior_ranks: bool| -> (usize, usize) {
            let env = small_env();
            let mut preset = load_preset("default").unwrap();
            preset.ppo.num_envs = 4;
            preset.ppo.net.skip = false;
            preset.ppo.skip_vine = 0.0;
            preset.ppo.net.prior_ranks = prior_ranks;
            let t = Trainer::new(&env, &preset, 64, 5, Device::Cpu).unwrap();
            let prior_alone = Trainer::new(&env, &preset, 64, 5, Device::Cpu).unwrap().model;
            tch::no_grad(|| {
                tch::manual_seed(3);
                for (name, w) in t.model.vs.variables() {
                    if name.starts_with("net.") && name != "net.prior_log_scale" {
                        w.shallow_clone().copy_(&(w.randn_like() * 0.05));
                    }
                }
            });
            play_twins(&t.model, &prior_alone, &t.groups[0], env.rounds, |_| {})
        };
        let (same, rounds) = plays_like_prior(true);
        assert_eq!(same, rounds, "with prior_ranks every plan is the prior alone's");
        let (same, rounds) = plays_like_prior(false);
        assert!(same < rounds, "a moved residual plays other plans: {same} of {rounds} the same");
    }

    #[test]
    fn rewards_per_gap_weigh_an_environment_by_one_over_its_oracle_gap() {
        // The weight is 1 / (oracle − uniform mean return) on the environment's own episodes,
        // computed here through the evaluation's public route; and the option is exactly a
        // reward scale of that weight: the same first update, bit for bit.
        let env = small_env();
        let mut preset = load_preset("tiny").unwrap();
        preset.prior.enabled = true;
        preset.ppo.reward_per_gap = true;
        let mut per_gap = Trainer::new(&env, &preset, 1024, 3, Device::Cpu).unwrap();
        let table = envs::evaluate_baselines(
            &env,
            &[envs::Baseline::Uniform, envs::Baseline::Oracle],
            ppo::GAP_EPISODES,
            envs::derive_seed(3, 4),
        )
        .unwrap();
        let gap = table.rows[1].mean_return - table.rows[0].mean_return;
        assert!(gap > ppo::GAP_FLOOR, "the oracle gains on this preset: {gap}");
        let w = per_gap.groups[0].reward_weight;
        assert_eq!(w, (1.0 / gap) as f32);
        assert_ne!(w, 1.0);

        preset.ppo.reward_per_gap = false;
        preset.ppo.reward_scale = w as f64;
        let mut scaled = Trainer::new(&env, &preset, 1024, 3, Device::Cpu).unwrap();
        assert_eq!(scaled.groups[0].reward_weight, 1.0);
        preset.ppo.reward_scale = 1.0;
        let mut plain = Trainer::new(&env, &preset, 1024, 3, Device::Cpu).unwrap();
        // The same initial weights in all three: libtorch's generator is global, and tests on
        // other threads may draw from it while a trainer draws its weights.
        scaled.model.vs.copy(&per_gap.model.vs).unwrap();
        plain.model.vs.copy(&per_gap.model.vs).unwrap();
        per_gap.iterate();
        scaled.iterate();
        for ((name, a), (_, b)) in per_gap.model.weights().iter().zip(scaled.model.weights().iter()) {
            assert!(a.equal(b), "{name} differs between per-gap rewards and the same reward scale");
        }
        // Without the option the first update differs (the value targets are the raw rewards).
        plain.iterate();
        assert!(plain.model.weights().iter().zip(per_gap.model.weights().iter()).any(|((_, a), (_, b))| !a.equal(b)));
    }

    #[test]
    fn without_the_reference_rollout_the_rewards_are_the_environments_own() {
        // The option off leaves the run exactly as before: no twins, and the mean reward PPO saw
        // is the environments' own; with it, the over-reference figure is logged.
        let env = small_env();
        let mut preset = load_preset("tiny").unwrap();
        preset.prior.enabled = true;
        let mut plain = Trainer::new(&env, &preset, 1024, 3, Device::Cpu).unwrap();
        assert!(plain.groups.iter().all(|g| g.reference.is_none()) && plain.reference_model.is_none());
        let st = plain.iterate();
        assert!(st.reward_over_reference.is_nan() && st.mean_reward.is_finite());
        preset.ppo.reference_rollout = true;
        let mut measured = Trainer::new(&env, &preset, 1024, 3, Device::Cpu).unwrap();
        let st2 = measured.iterate();
        assert!(st2.reward_over_reference.is_finite());
        // The learner's rollout is the same with or without twins (they draw nothing from its
        // streams), so the environments' own mean reward is too.
        assert_eq!(st.mean_reward, st2.mean_reward);
    }
}
