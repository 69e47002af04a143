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
use std::sync::Arc;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use envs::{EnvPreset, EnvSpec, EpisodeSummary, GLOBAL_FEATURES, SITE_FEATURES, VecEnv, VecEnvSnapshot};

use crate::adam::Adam;
use crate::ddim::{self, DdimConfig, Replay};
use crate::model::{ActMode, BudgetContext, ObsBatch, PolicyModel, Schema};
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
    venv: VecEnv,
    opt: Adam,
    ddim_opt: Option<Adam>,
    replay: Option<Replay>,
    rng: ChaCha8Rng,
    /// Iterations done.
    pub iteration: usize,
    /// Environment steps done.
    pub global_step: u64,
    episode_ranks_env0: Vec<u32>,
}

/// Serializable resume state (goes into the checkpoint's `state`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResumeState {
    iteration: usize,
    global_step: u64,
    rng: ChaCha8Rng,
    venv: VecEnvSnapshot,
    adam_step: i64,
    ddim_adam_step: i64,
    replay_len: usize,
    replay_pos: usize,
    ddim_active: bool,
    episode_ranks_env0: Vec<u32>,
}

/// The JSON `config` of a policy checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// The environment preset trained on (complete, so evaluation can rebuild it).
    pub env_preset: EnvPreset,
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
    /// A new run: fresh weights (seeded by `seed`), `ppo.num_envs` environments.
    pub fn new(
        env_preset: &EnvPreset,
        preset: &PolicyPreset,
        total_steps: u64,
        seed: u64,
        device: Device,
    ) -> Result<Self, PolicyError> {
        let spec: Arc<EnvSpec> = EnvSpec::new(env_preset)?;
        // A skipped round saves nothing under a fixed parameter budget (the adapter exists
        // whether or not the round is played): no skip head there.
        let mut preset = preset.clone();
        if spec.resource.kind() == envs::presets::ResourceKind::Budget {
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
        let venv = VecEnv::from_spec(spec.clone(), preset.ppo.num_envs, envs::derive_seed(seed, 1));
        let opt = Adam::new(&model.vs, "net.", preset.ppo.learning_rate, preset.ppo.adam_eps);
        let ddim_opt = preset.ddim.enabled.then(|| Adam::new(&model.vs, "ddim.", preset.ddim.learning_rate, 1e-8));
        let replay = preset.ddim.enabled.then(|| Replay::new(preset.ddim.replay_capacity, spec.n_sites()));
        Ok(Trainer {
            model,
            preset: preset.clone(),
            env_preset: env_preset.clone(),
            total_steps,
            seed,
            venv,
            opt,
            ddim_opt,
            replay,
            rng: ChaCha8Rng::seed_from_u64(envs::derive_seed(seed, 2)),
            iteration: 0,
            global_step: 0,
            episode_ranks_env0: Vec::new(),
        })
    }

    /// Number of sites of the training environment.
    pub fn n_sites(&self) -> usize {
        self.venv.n_sites()
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
    pub fn iterate(&mut self) -> IterationStats {
        let cfg = self.preset.ppo.clone();
        let (n, l, k) = (cfg.num_envs, self.venv.n_sites(), self.model.ranks.len());
        let (t_len, g_dim, s_dim) = (cfg.num_steps, GLOBAL_FEATURES, SITE_FEATURES);
        let frac = 1.0 - self.iteration as f64 / self.total_iterations() as f64;
        let lr = if cfg.anneal_lr { cfg.learning_rate * frac } else { cfg.learning_rate };

        let mut buf_g = Vec::with_capacity(t_len * n * g_dim);
        let mut buf_s = Vec::with_capacity(t_len * n * l * s_dim);
        let mut buf_a = Vec::with_capacity(t_len * n * l);
        let mut buf_logp = Vec::with_capacity(t_len * n * l);
        let mut buf_v = Vec::with_capacity(t_len * n);
        let mut buf_r = Vec::with_capacity(t_len * n);
        let mut buf_done = Vec::with_capacity(t_len * n);
        let has_skip = self.model.net.has_skip();
        let mut buf_skip: Vec<f32> = Vec::with_capacity(if has_skip { t_len * n } else { 0 });
        let mut buf_skip_logp: Vec<f32> = Vec::with_capacity(if has_skip { t_len * n } else { 0 });
        let mut buf_skip_margin: Vec<f32> = Vec::new();
        let mut buf_skip_allowed: Vec<f32> = Vec::with_capacity(if has_skip { t_len * n } else { 0 });
        let mut buf_feasible: Vec<bool> = Vec::with_capacity(t_len * n * l * k);
        let mut buf_prior = Vec::with_capacity(if self.model.prior.is_some() { t_len * n * l * k } else { 0 });
        let dims: Vec<u32> = self.venv.spec().sites.iter().map(|s| s.max_rank()).collect();
        let mut stats = IterationStats::default();
        let unit_cost = self.venv.spec().unit_cost.clone();
        let t_start = std::time::Instant::now();

        for _ in 0..t_len {
            // Running statistics see every observation as it arrives (CleanRL's wrapper order).
            self.model.norm.global.update(self.venv.obs_global());
            self.model.norm.site.update(self.venv.obs_sites());
            let budgets: Vec<f64> = (0..n).map(|i| self.venv.context(i).conservative_budget).collect();
            let d = self.model.act(
                ObsBatch { global: self.venv.obs_global(), sites: self.venv.obs_sites(), n_envs: n, n_sites: l },
                BudgetContext { unit_cost: &unit_cost, budgets: &budgets, dims: Some(&dims) },
                ActMode::Sample(&mut self.rng),
            );
            self.venv
                .step_indices_skipping(&d.executed, &d.skip)
                .expect("the policy emits in-range indices of the right length, and skips only where allowed");
            if has_skip {
                buf_skip.extend(d.skip.iter().map(|&s| s as u8 as f32));
                buf_skip_logp.extend_from_slice(&d.skip_logp);
                buf_skip_margin.extend_from_slice(&d.skip_margin);
                buf_skip_allowed.extend(d.skip_allowed.iter().map(|&a| a as u8 as f32));
            }

            let rewards = self.venv.rewards();
            if let Some(replay) = self.replay.as_mut() {
                for e in 0..n {
                    let enc = |v: &[u8]| -> Vec<f32> { v.iter().map(|&j| ddim::encode(j as usize, k)).collect() };
                    replay.push(
                        &d.global[e * g_dim..(e + 1) * g_dim],
                        &d.sites[e * l * s_dim..(e + 1) * l * s_dim],
                        &enc(&d.coarse[e * l..(e + 1) * l]),
                        &enc(&d.executed[e * l..(e + 1) * l]),
                        rewards[e] * cfg.reward_scale as f32,
                    );
                }
            }
            buf_g.extend_from_slice(&d.global);
            buf_s.extend_from_slice(&d.sites);
            buf_a.extend(d.coarse.iter().map(|&j| j as i64));
            buf_logp.extend_from_slice(&d.logp);
            buf_feasible.extend_from_slice(&d.feasible);
            buf_prior.extend_from_slice(&d.prior);
            let scale = cfg.reward_scale as f32;
            match cfg.credit {
                Credit::PerSite => {
                    buf_v.extend_from_slice(&d.values);
                    buf_r.extend(self.venv.site_rewards().iter().map(|&r| r * scale));
                    for &done in self.venv.dones() {
                        buf_done.extend(std::iter::repeat_n(if done { 1.0f32 } else { 0.0 }, l));
                    }
                }
                Credit::Shared => {
                    buf_v.extend(d.values.chunks_exact(l).map(|v| v.iter().sum::<f32>()));
                    buf_r.extend(rewards.iter().map(|&r| r * scale));
                    buf_done.extend(self.venv.dones().iter().map(|&x| if x { 1.0f32 } else { 0.0 }));
                }
            }

            self.episode_ranks_env0.extend(d.executed[..l].iter().map(|&j| self.model.ranks[j as usize]));
            if self.venv.dones()[0] {
                let rounds = self.episode_ranks_env0.len() / l.max(1);
                stats.episode_ranks = Some((rounds, std::mem::take(&mut self.episode_ranks_env0)));
            }
            stats.episodes.extend_from_slice(self.venv.finished());
            stats.last_ranks = d.executed.iter().map(|&j| self.model.ranks[j as usize]).collect();
        }

        // Bootstrap value of the observation after the rollout (statistics not updated here).
        let (gt, st, mask, _, _) = self.model.tensors(self.venv.obs_global(), self.venv.obs_sites(), n, l);
        let site_values = tch::no_grad(|| self.model.net.forward(&gt, &st, &mask).site_values);
        // Per-site credit runs GAE over n × l independent reward streams laid out [T, n, l].
        let (streams, next_value): (usize, Vec<f32>) = match cfg.credit {
            Credit::PerSite => (n * l, Vec::try_from(site_values.flatten(0, -1)).expect("f32")),
            Credit::Shared => (n, Vec::try_from(site_values.sum_dim_intlist(1, false, Kind::Float)).expect("f32")),
        };
        let (adv, ret) = ppo::gae(&buf_r, &buf_v, &buf_done, &next_value, streams, cfg.gamma, cfg.gae_lambda);
        stats.mean_reward = buf_r.iter().map(|&r| r as f64).sum::<f64>() / (t_len * n) as f64;

        stats.rollout_s = t_start.elapsed().as_secs_f64();
        let t_update = std::time::Instant::now();
        let dev = self.model.device();
        let b = (t_len * n) as i64;
        let batch = Batch {
            global: Tensor::from_slice(&buf_g).view([b, g_dim as i64]).to_device(dev),
            sites: Tensor::from_slice(&buf_s).view([b, l as i64, s_dim as i64]).to_device(dev),
            mask: Tensor::ones([b, l as i64], (Kind::Float, dev)),
            actions: Tensor::from_slice(&buf_a).view([b, l as i64]).to_device(dev),
            logp: Tensor::from_slice(&buf_logp).view([b, l as i64]).to_device(dev),
            values: Tensor::from_slice(&buf_v).view(value_shape(cfg.credit, b, l).as_slice()).to_device(dev),
            advantages: Tensor::from_slice(&adv).view(value_shape(cfg.credit, b, l).as_slice()).to_device(dev),
            returns: Tensor::from_slice(&ret).view(value_shape(cfg.credit, b, l).as_slice()).to_device(dev),
            prior: (!buf_prior.is_empty())
                .then(|| Tensor::from_slice(&buf_prior).view([b, l as i64, k as i64]).to_device(dev)),
            feasible: Some(Tensor::from_slice(&buf_feasible).view([b, l as i64, k as i64]).to_device(dev)),
            skip: has_skip.then(|| ppo::SkipBatch {
                taken: Tensor::from_slice(&buf_skip).to_device(dev),
                logp: Tensor::from_slice(&buf_skip_logp).to_device(dev),
                margin: (!buf_skip_margin.is_empty()).then(|| Tensor::from_slice(&buf_skip_margin).to_device(dev)),
                allowed: Tensor::from_slice(&buf_skip_allowed).to_device(dev),
            }),
        };
        let rng = &mut self.rng;
        stats.update = ppo::update(&cfg, &self.model.net, &self.model.vs, &mut self.opt, &batch, lr, |len| {
            let mut p: Vec<i64> = (0..len as i64).collect();
            p.shuffle(rng);
            p
        });
        stats.ddim_loss = self.ddim_update();
        stats.update_s = t_update.elapsed().as_secs_f64();

        self.iteration += 1;
        self.global_step += (t_len * n) as u64;
        stats.iteration = self.iteration;
        stats.global_step = self.global_step;
        stats
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
        if let Some(r) = &self.replay {
            tensors.extend(r.tensors());
        }
        let config = CheckpointConfig {
            env_preset: self.env_preset.clone(),
            policy_preset: self.preset.clone(),
            schema: Schema::current(&self.model.ranks),
            total_steps: self.total_steps,
            seed: self.seed,
        };
        let state = ResumeState {
            iteration: self.iteration,
            global_step: self.global_step,
            rng: self.rng.clone(),
            venv: self.venv.snapshot(),
            adam_step: self.opt.step,
            ddim_adam_step: self.ddim_opt.as_ref().map_or(0, |o| o.step),
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
        let mut t = Trainer::new(
            &cfg.env_preset,
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
        if let Some(r) = t.replay.as_mut() {
            r.load(tensors, rs.replay_len, rs.replay_pos)?;
        }
        t.venv = VecEnv::restore(t.venv.spec().clone(), rs.venv)?;
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
