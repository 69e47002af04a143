//! The environment: hidden site parameters, progress dynamics, reward, observation, and the
//! vectorized stepper.
//!
//! # One round
//! 1. At the start of round t the environment draws the data proxies (token entropy, OOV rate),
//!    the resource's true budget B_t and its noisy estimate, and per-site noisy signals, and
//!    emits the [`Observation`].
//! 2. The policy returns one rank per site from the rank set.
//! 3. Cost ratio c = Σ_l r_l·u_l / B_t (u_l = cost of one rank unit at site l).
//!    - c > 1 (violation, AirLLM): reward = −(violation_coef + cost_coef)·min(c, cap); no
//!      progress, no resize: ranks and captured energy stay as they were.
//!    - otherwise, per site: shrinking r_old → r_new keeps the captured share proportionally,
//!      q ← q·E(r_new)/E(r_old) (the dropped components are lost; DR-RL's ‖ΔA‖_F =
//!      √(Σ_{band} σ_k²) is the perturbation), then q ← q + η_t·(E(r_new) − q). The residual of
//!      site l is 1 − q_l, which moves toward the floor 1 − E(r_new).
//!      loss = L∞ + Σ_l w_l·(1 − q_l); reward = −loss − cost_coef·c − flops_coef·F/flops_scale −
//!      perturbation_coef·P, with F = Σ_l r_l·flops_per_rank_l and P = mean_l ‖ΔA_l‖_F.
//! 4. After `rounds` rounds the episode ends; the vectorized stepper resets that environment
//!    at once (auto-reset) and reports the episode in [`VecEnv::finished`].
//!
//! All randomness comes from one ChaCha8 stream per environment, and the number of draws per
//! round does not depend on the actions, so two policies evaluated on the same seed face the
//! same spectra, sensitivities and channel realisations (common random numbers).

use std::sync::Arc;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use crate::EnvError;
use crate::oracle::{MckpSolver, SolveStats};
use crate::presets::{EnvPreset, ResourceKind};
use crate::resource::{ResourceModel, ResourceState};
use crate::sites::{RankSet, Site, explicit_tables, llama_sites, power_law_tables};

/// Number of global observation features. See [`Observation`] for the table.
pub const GLOBAL_FEATURES: usize = 18;
/// Number of per-site observation features. See [`Observation`] for the table.
pub const SITE_FEATURES: usize = 13;
/// Lags of the budget estimate kept in the observation.
pub const HISTORY: usize = 4;
/// Quantile levels of the tabulated observation noise (a power of two).
const NOISE_LEVELS: usize = 1024;

/// Φ⁻¹(p), the standard normal quantile (Acklam's rational approximation, relative error
/// below 1.2e-9), used to tabulate the observation noise.
#[allow(clippy::excessive_precision)]
pub fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969683028665376e1,
        2.209460984245205e2,
        -2.759285104469687e2,
        1.383577518672690e2,
        -3.066479806614716e1,
        2.506628277459239,
    ];
    const B: [f64; 5] =
        [-5.447609879822406e1, 1.615858368580409e2, -1.556989798598866e2, 6.680131188771972e1, -1.328068155288572e1];
    const C: [f64; 6] = [
        -7.784894002430293e-3,
        -3.223964580411365e-1,
        -2.400758277161838,
        -2.549732539343734,
        4.374664141464968,
        2.938163982698783,
    ];
    const D: [f64; 4] = [7.784695709041462e-3, 3.224671290700398e-1, 2.445134137142996, 3.754408661907416];
    let p_low = 0.02425;
    if p < p_low {
        let q = (-2.0 * p.ln()).sqrt();
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    } else if p <= 1.0 - p_low {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        -normal_quantile(1.0 - p)
    }
}

/// One environment's observation, as plain vectors (no ndarray types cross the crate border).
///
/// Every field is something a real fine-tuning run can measure, so a real run fills the same
/// schema ([`crate::schema`] has the machine-readable names).
///
/// `global` (length [`GLOBAL_FEATURES`]):
///
/// | idx | name | meaning (real-run source) |
/// |----:|------|---------------------------|
/// | 0 | `resource_channel` | 1 if the resource is a wireless channel |
/// | 1 | `resource_compute` | 1 if it is a compute/latency budget |
/// | 2 | `resource_budget` | 1 if it is a fixed rank/parameter budget |
/// | 3 | `budget_ratio_est` | estimated budget / cost of the all-max-rank plan, clipped to [0, 4] (channel estimate → capacity × deadline; measured throughput × latency budget; the budget schedule) |
/// | 4–7 | `budget_ratio_est_lag1..4` | the same for the previous 4 rounds (the current value repeated at episode start) |
/// | 8 | `resource_level` | channel: (SNR estimate dB − 10)/10; compute: ln(estimated / mean throughput); budget: 0 |
/// | 9 | `bandwidth` | bandwidth / largest bandwidth of the preset (channel), else 0 |
/// | 10 | `token_entropy` | normalised token entropy of the round's batch, in [0, 1] |
/// | 11 | `oov_rate` | share of unknown tokens in the batch |
/// | 12 | `progress` | round / rounds |
/// | 13 | `loss_ratio` | current training loss / loss at the episode start |
/// | 14 | `last_violation` | 1 if the previous round violated the budget |
/// | 15 | `last_cost_ratio` | previous round's c = required / available, clipped to [0, violation_cost_cap] |
/// | 16 | `mean_rank` | mean current rank / max rank |
/// | 17 | `n_sites_log` | log2(number of sites) / 8 |
///
/// `sites` (row-major, `n_sites` rows of [`SITE_FEATURES`]):
///
/// | idx | name | meaning (real-run source) |
/// |----:|------|---------------------------|
/// | 0 | `rank` | current rank / max rank of the set |
/// | 1 | `rank_log` | log2(1 + rank) / log2(1 + max rank) |
/// | 2 | `d_in` | d_in / largest dimension among the sites |
/// | 3 | `d_out` | d_out / largest dimension among the sites |
/// | 4 | `cost_share` | cost of one rank unit here / mean over sites |
/// | 5 | `depth` | layer / (layers − 1) (0 with one layer) |
/// | 6 | `role_qk` | 1 for q/k projections |
/// | 7 | `role_vo` | 1 for v/o projections |
/// | 8 | `role_mlp_in` | 1 for gate/up projections |
/// | 9 | `role_mlp_out` | 1 for down projections |
/// | 10 | `sensitivity` | noisy sensitivity share × n_sites (mean 1): AdaLoRA importance EMA of \|θ·∇θ\| summed over the site, normalised |
/// | 11 | `grad_norm` | noisy w_l·√(residual_l) × n_sites: gradient norm at the site, normalised by the sum of the sensitivities |
/// | 12 | `tail_share` | noisy σ_r² / Σ_{k≤r} σ_k² at the current rank r (0 at rank 0): energy share of the adapter's smallest singular value — large means more rank would still help |
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    /// Global features, length [`GLOBAL_FEATURES`].
    pub global: Vec<f32>,
    /// Per-site features, `n_sites × SITE_FEATURES`, row-major.
    pub sites: Vec<f32>,
    /// Number of sites (rows of `sites`).
    pub n_sites: usize,
}

impl Observation {
    /// An all-zero observation for `n_sites` sites (for a real run to fill in).
    pub fn zeros(n_sites: usize) -> Self {
        Self { global: vec![0.0; GLOBAL_FEATURES], sites: vec![0.0; n_sites * SITE_FEATURES], n_sites }
    }

    /// The feature row of site `l`.
    pub fn site(&self, l: usize) -> &[f32] {
        &self.sites[l * SITE_FEATURES..(l + 1) * SITE_FEATURES]
    }
}

/// Everything about an environment that does not change during training: sites, rank set,
/// resource model, coefficients, and tables derived from them. Shared by all environments of a
/// [`VecEnv`].
#[derive(Debug, Clone)]
pub struct EnvSpec {
    /// The preset it was built from.
    pub preset: EnvPreset,
    /// The sites.
    pub sites: Vec<Site>,
    /// The allowed ranks.
    pub rank_set: RankSet,
    /// The resource model.
    pub resource: ResourceModel,
    /// Cost of one rank unit per site, in the resource's unit.
    pub unit_cost: Vec<f64>,
    /// Σ_l unit_cost_l.
    pub sum_unit_cost: f64,
    /// Cost of the plan with every site at the largest rank.
    pub max_plan_cost: f64,
    /// FLOPs per rank unit per site (compute model's formula; per token if the preset has no
    /// compute section), for the DR-RL FLOPs term.
    pub flops_per_rank: Vec<f64>,
    /// Per-site static observation features (indices 2..=9), `n_sites × 8`.
    static_obs: Vec<f32>,
    /// Per-site mean β (role + depth trend), for generated spectra.
    beta_mean: Vec<f64>,
    /// Per-site mean log sensitivity.
    log_w_mean: Vec<f64>,
    /// Largest bandwidth of the preset (for normalisation).
    max_bandwidth: f64,
    /// Log-normal observation-noise multipliers exp(σ·z_i) at the 1024 normal quantiles
    /// z_i = Φ⁻¹((i + ½)/1024), for sensitivity, gradient norm and tail share. Drawing a noise
    /// factor is then one 10-bit slice of a random word and one table load instead of a
    /// Gaussian sample and an `exp` — the stepper's hot loop draws three per site-step.
    noise_tables: Vec<f32>,
    /// log2(1 + r)/log2(1 + r_max) per rank index.
    rank_log: Vec<f32>,
}

impl EnvSpec {
    /// Builds the spec from a validated preset; errors if a rank exceeds some site's
    /// min(d_in, d_out).
    pub fn new(preset: &EnvPreset) -> Result<Arc<Self>, EnvError> {
        let sites = match (&preset.calibration_data, &preset.sites.calibration) {
            (Some(c), _) => c.sites(),
            (None, Some(path)) => {
                return Err(EnvError::Config {
                    key: "sites.calibration".into(),
                    found: path.clone(),
                    allowed: "a preset loaded through presets::load so the file is read".into(),
                });
            }
            (None, None) => llama_sites(
                preset.sites.layers.unwrap_or(1),
                preset.sites.hidden.unwrap_or(1),
                preset.sites.intermediate.unwrap_or(1),
                &preset.sites.projections,
            ),
        };
        let min_dim = sites.iter().map(Site::max_rank).min().unwrap_or(0);
        let rank_set = RankSet::new(&preset.ranks, min_dim)?;
        let resource = ResourceModel::new(&preset.resource);
        let unit_cost: Vec<f64> = sites.iter().map(|s| resource.unit_cost(s)).collect();
        let sum_unit_cost: f64 = unit_cost.iter().sum();
        let max_plan_cost = sum_unit_cost * rank_set.max() as f64;
        let flops_per_rank = sites
            .iter()
            .map(|s| match &resource {
                ResourceModel::Compute(c) => c.flops_per_rank(s),
                _ => match &preset.resource.compute {
                    Some(c) => crate::resource::ComputeModel { cfg: c.clone() }.flops_per_rank(s),
                    None => 2.0 * s.params_per_rank() as f64,
                },
            })
            .collect();
        let n = sites.len();
        let max_layer = sites.iter().map(|s| s.layer).max().unwrap_or(0);
        let max_dim = sites.iter().map(|s| s.d_in.max(s.d_out)).max().unwrap_or(1) as f32;
        let mean_unit = sum_unit_cost / n.max(1) as f64;
        let depth: Vec<f64> =
            sites.iter().map(|s| if max_layer == 0 { 0.0 } else { s.layer as f64 / max_layer as f64 }).collect();
        let mut static_obs = Vec::with_capacity(n * 8);
        for (l, s) in sites.iter().enumerate() {
            let mut role = [0.0f32; 4];
            if let Some(g) = s.role.obs_group() {
                role[g] = 1.0;
            }
            static_obs.extend_from_slice(&[
                s.d_in as f32 / max_dim,
                s.d_out as f32 / max_dim,
                (unit_cost[l] / mean_unit) as f32,
                depth[l] as f32,
                role[0],
                role[1],
                role[2],
                role[3],
            ]);
        }
        let sp = &preset.spectrum;
        let beta_mean =
            sites.iter().zip(&depth).map(|(s, d)| sp.beta.get(s.role) + sp.beta_depth_slope * (d - 0.5)).collect();
        let se = &preset.sensitivity;
        let log_w_mean =
            sites.iter().zip(&depth).map(|(s, d)| se.by_role.get(s.role).ln() + se.depth_slope * (d - 0.5)).collect();
        let o = &preset.observation;
        let mut noise_tables = Vec::with_capacity(3 * NOISE_LEVELS);
        for sigma in [o.sensitivity_noise, o.grad_noise, o.tail_noise] {
            noise_tables.extend(
                (0..NOISE_LEVELS)
                    .map(|i| (sigma * normal_quantile((i as f64 + 0.5) / NOISE_LEVELS as f64)).exp() as f32),
            );
        }
        let lr = (1.0 + rank_set.max() as f64).log2();
        let rank_log = rank_set.ranks().iter().map(|&r| ((1.0 + r as f64).log2() / lr) as f32).collect();
        let max_bandwidth =
            preset.resource.channel.as_ref().map(|c| c.bandwidth_hz.iter().copied().fold(0.0, f64::max)).unwrap_or(1.0);
        Ok(Arc::new(Self {
            preset: preset.clone(),
            sites,
            rank_set,
            resource,
            unit_cost,
            sum_unit_cost,
            max_plan_cost,
            flops_per_rank,
            static_obs,
            beta_mean,
            log_w_mean,
            max_bandwidth,
            noise_tables,
            rank_log,
        }))
    }

    /// Number of sites.
    pub fn n_sites(&self) -> usize {
        self.sites.len()
    }

    /// Cost of a rank plan in the resource's unit (bits, FLOPs, ranks or parameters). Errors on a
    /// wrong length or a rank outside the set.
    pub fn plan_cost(&self, ranks: &[u32]) -> Result<f64, EnvError> {
        self.check_plan(ranks, 0)?;
        Ok(ranks.iter().zip(&self.unit_cost).map(|(&r, u)| r as f64 * u).sum())
    }

    /// Checks one plan; `env` is only used in the error.
    pub fn check_plan(&self, ranks: &[u32], env: usize) -> Result<(), EnvError> {
        if ranks.len() != self.n_sites() {
            return Err(EnvError::ActionLength { expected: self.n_sites(), found: ranks.len() });
        }
        for (l, &r) in ranks.iter().enumerate() {
            if self.rank_set.index_of(r).is_none() {
                return Err(self.rank_error(env, l, r));
            }
        }
        Ok(())
    }

    fn rank_error(&self, env: usize, site: usize, rank: u32) -> EnvError {
        EnvError::RankNotInSet {
            env,
            site,
            site_name: self.sites[site].name.clone(),
            rank,
            allowed: self.rank_set.ranks().to_vec(),
        }
    }

    /// The static per-site observation features (indices 2..=9 of a site row: shapes, cost share,
    /// depth, role), `n_sites × 8`, for a real run filling the same schema.
    pub fn static_site_features(&self) -> &[f32] {
        &self.static_obs
    }

    /// The largest bandwidth of the preset (normalises the `bandwidth` feature).
    pub fn max_bandwidth(&self) -> f64 {
        self.max_bandwidth
    }

    /// Unit of the resource's budget, for tables.
    pub fn resource_unit(&self) -> &'static str {
        match self.preset.resource.kind {
            ResourceKind::Channel => "bits",
            ResourceKind::Compute => "FLOPs",
            ResourceKind::Budget => match self.preset.resource.budget.as_ref().map(|b| b.unit) {
                Some(crate::presets::BudgetUnit::Params) => "params",
                _ => "ranks",
            },
        }
    }
}

/// Summary of one finished episode.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EpisodeSummary {
    /// Which environment of the batch.
    pub env: usize,
    /// Sum of rewards.
    pub episode_return: f64,
    /// Loss after the last round.
    pub final_loss: f64,
    /// Resource spent over the episode (cost of every plan attempted, in the resource's unit).
    pub resource_used: f64,
    /// Rounds that violated the budget.
    pub violations: u32,
    /// Rounds the policy skipped (nothing sent, no progress).
    #[serde(default)]
    pub skips: u32,
    /// Rounds played.
    pub rounds: u32,
}

/// Outcome of one round in one environment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundOutcome {
    /// Reward.
    pub reward: f64,
    /// Loss after the round.
    pub loss: f64,
    /// c = plan cost / true budget.
    pub cost_ratio: f64,
    /// Plan cost in the resource's unit.
    pub cost: f64,
    /// Whether c > 1.
    pub violation: bool,
    /// Whether the policy skipped the round.
    #[serde(default)]
    pub skipped: bool,
}

/// The full mutable state of one environment (serializable, so training can resume exactly).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnvState {
    rng: ChaCha8Rng,
    round: u32,
    episodes: u64,
    // Hidden per-site parameters of the episode.
    w: Vec<f32>,
    beta: Vec<f32>,
    total_energy: Vec<f32>,
    energy: Vec<f32>,
    tail: Vec<f32>,
    // Dynamic per-site state.
    captured: Vec<f32>,
    rank_idx: Vec<u8>,
    res: ResourceState,
    entropy: f64,
    oov: f64,
    eta: f64,
    loss: f64,
    initial_loss: f64,
    last_violation: bool,
    last_cost_ratio: f64,
    budget_hist: [f32; HISTORY],
    ep_return: f64,
    ep_used: f64,
    ep_violations: u32,
    #[serde(default)]
    ep_skips: u32,
}

impl EnvState {
    fn new(spec: &EnvSpec, seed: u64) -> Self {
        let n = spec.n_sites();
        let k = spec.rank_set.len();
        let mut s = Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            round: 0,
            episodes: 0,
            w: vec![0.0; n],
            beta: vec![0.0; n],
            total_energy: vec![0.0; n],
            energy: vec![0.0; n * k],
            tail: vec![0.0; n * k],
            captured: vec![0.0; n],
            rank_idx: vec![0; n],
            res: ResourceState::default(),
            entropy: 0.0,
            oov: 0.0,
            eta: 0.0,
            loss: 0.0,
            initial_loss: 0.0,
            last_violation: false,
            last_cost_ratio: 0.0,
            budget_hist: [0.0; HISTORY],
            ep_return: 0.0,
            ep_used: 0.0,
            ep_violations: 0,
            ep_skips: 0,
        };
        s.reset_episode(spec);
        s
    }

    /// Draws a new episode: hidden spectra and sensitivities, resource state, round 0.
    fn reset_episode(&mut self, spec: &EnvSpec) {
        let p = &spec.preset;
        let n = spec.n_sites();
        let k = spec.rank_set.len();
        let ranks = spec.rank_set.ranks();
        let rng = &mut self.rng;
        if let Some(cal) = &p.calibration_data {
            let sum: f64 = cal.sites.iter().map(|s| s.sensitivity).sum();
            for (l, cs) in cal.sites.iter().enumerate() {
                self.w[l] = (cs.sensitivity / sum * p.sensitivity.total) as f32;
                self.beta[l] = f32::NAN;
                self.total_energy[l] = explicit_tables(
                    &cs.spectrum,
                    cs.tail_energy,
                    1.0,
                    ranks,
                    &mut self.energy[l * k..(l + 1) * k],
                    &mut self.tail[l * k..(l + 1) * k],
                ) as f32;
            }
        } else {
            let sp = &p.spectrum;
            let mut wsum = 0.0;
            for l in 0..n {
                let nb: f64 = StandardNormal.sample(rng);
                let na: f64 = StandardNormal.sample(rng);
                let nw: f64 = StandardNormal.sample(rng);
                let beta = (spec.beta_mean[l] + sp.beta_jitter * nb).clamp(sp.beta_min, sp.beta_max);
                let a = (sp.scale_log_std * na).exp();
                self.beta[l] = beta as f32;
                let site = &spec.sites[l];
                self.total_energy[l] = power_law_tables(
                    a,
                    beta,
                    site.max_rank(),
                    ranks,
                    &mut self.energy[l * k..(l + 1) * k],
                    &mut self.tail[l * k..(l + 1) * k],
                ) as f32;
                let w = (spec.log_w_mean[l] + p.sensitivity.log_std * nw).exp();
                self.w[l] = w as f32;
                wsum += w;
            }
            let scale = p.sensitivity.total / wsum;
            for w in &mut self.w {
                *w = (*w as f64 * scale) as f32;
            }
        }
        self.captured.iter_mut().for_each(|c| *c = 0.0);
        self.rank_idx.iter_mut().for_each(|r| *r = spec.rank_set.index_of(0).unwrap_or(0) as u8);
        // Initial ranks are the smallest of the set; if it is not 0, nothing is captured yet.
        spec.resource.reset(&mut self.res, &mut self.rng);
        let d = &p.dynamics;
        let n1: f64 = StandardNormal.sample(&mut self.rng);
        let n2: f64 = StandardNormal.sample(&mut self.rng);
        self.entropy = d.entropy_std * n1;
        self.oov = d.oov_std * n2;
        self.round = 0;
        self.loss = p.dynamics.loss_floor + p.sensitivity.total;
        self.initial_loss = self.loss;
        self.last_violation = false;
        self.last_cost_ratio = 0.0;
        self.ep_return = 0.0;
        self.ep_used = 0.0;
        self.ep_violations = 0;
        self.ep_skips = 0;
        self.begin_round(spec);
        let b = self.budget_ratio(spec);
        self.budget_hist = [b; HISTORY];
    }

    fn budget_ratio(&self, spec: &EnvSpec) -> f32 {
        (self.res.est_budget / spec.max_plan_cost).clamp(0.0, 4.0) as f32
    }

    /// Draws the round's data proxies and resource budget.
    fn begin_round(&mut self, spec: &EnvSpec) {
        let p = &spec.preset;
        let d = &p.dynamics;
        if self.round > 0 {
            let rho = d.data_rho;
            let s = (1.0 - rho * rho).sqrt();
            let n1: f64 = StandardNormal.sample(&mut self.rng);
            let n2: f64 = StandardNormal.sample(&mut self.rng);
            self.entropy = rho * self.entropy + s * d.entropy_std * n1;
            self.oov = rho * self.oov + s * d.oov_std * n2;
        }
        let ent = (d.entropy_mean + self.entropy).clamp(0.0, 1.0);
        self.eta = (d.learning_rate * (1.0 - d.entropy_effect * (ent - d.entropy_mean))).clamp(0.0, 1.0);
        spec.resource.draw_round(
            &mut self.res,
            self.round,
            p.rounds,
            p.baselines.margin,
            spec.sum_unit_cost,
            &mut self.rng,
        );
    }

    /// Writes the observation of the current round. Draws exactly one 64-bit word per site.
    fn write_obs(&mut self, spec: &EnvSpec, global: &mut [f32], sites: &mut [f32]) {
        let p = &spec.preset;
        let n = spec.n_sites();
        let k = spec.rank_set.len();
        let kind = spec.resource.kind();
        global[0] = (kind == ResourceKind::Channel) as u8 as f32;
        global[1] = (kind == ResourceKind::Compute) as u8 as f32;
        global[2] = (kind == ResourceKind::Budget) as u8 as f32;
        global[3] = self.budget_ratio(spec);
        global[4..4 + HISTORY].copy_from_slice(&self.budget_hist);
        global[8] = match &spec.resource {
            ResourceModel::Channel(_) => ((self.res.snr_est_db - 10.0) / 10.0) as f32,
            ResourceModel::Compute(c) => {
                (self.res.est_budget / (c.cfg.throughput_flops * c.cfg.latency_budget_s)).ln() as f32
            }
            ResourceModel::Budget(_) => 0.0,
        };
        global[9] =
            if kind == ResourceKind::Channel { (self.res.bandwidth_hz / spec.max_bandwidth) as f32 } else { 0.0 };
        global[10] = (p.dynamics.entropy_mean + self.entropy).clamp(0.0, 1.0) as f32;
        global[11] = (p.dynamics.oov_mean + self.oov).clamp(0.0, 1.0) as f32;
        global[12] = self.round as f32 / p.rounds as f32;
        global[13] = (self.loss / self.initial_loss) as f32;
        global[14] = self.last_violation as u8 as f32;
        global[15] = self.last_cost_ratio.clamp(0.0, p.reward.violation_cost_cap) as f32;
        let rmax = spec.rank_set.max() as f32;
        let ranks = spec.rank_set.ranks();
        let mut rank_sum = 0.0f32;
        let (ts, rest) = spec.noise_tables.split_at(NOISE_LEVELS);
        let (tg, tt) = rest.split_at(NOISE_LEVELS);
        let wscale = n as f32 / p.sensitivity.total as f32;
        const MASK: u64 = NOISE_LEVELS as u64 - 1;
        for l in 0..n {
            let row = &mut sites[l * SITE_FEATURES..(l + 1) * SITE_FEATURES];
            let j = self.rank_idx[l] as usize;
            let r = ranks[j] as f32;
            rank_sum += r;
            row[0] = r / rmax;
            row[1] = spec.rank_log[j];
            row[2..10].copy_from_slice(&spec.static_obs[l * 8..(l + 1) * 8]);
            let bits = self.rng.next_u64();
            let w = self.w[l] * wscale;
            row[10] = w * ts[(bits & MASK) as usize];
            row[11] = w * (1.0 - self.captured[l]).max(0.0).sqrt() * tg[((bits >> 10) & MASK) as usize];
            row[12] = self.tail[l * k + j] * tt[((bits >> 20) & MASK) as usize];
        }
        global[16] = rank_sum / (n as f32 * rmax);
        global[17] = (n as f32).log2() / 8.0;
    }

    /// Plays one round with rank indices `idx` (already validated).
    /// Plays one round. `site_rewards` receives the reward split over the sites, summing to the
    /// round's reward: each site's own loss term w_l·(1 − q_l) plus an equal share of the floor,
    /// its own FLOPs and perturbation terms, and a share of the resource terms (cost and violation
    /// penalty) proportional to its share of the plan's cost.
    fn play(&mut self, spec: &EnvSpec, idx: &[u8], cost: f64, skip: bool, site_rewards: &mut [f32]) -> RoundOutcome {
        if skip {
            return self.play_skip(spec, site_rewards);
        }
        let p = &spec.preset;
        let rw = &p.reward;
        let c = cost / self.res.true_budget.max(f64::MIN_POSITIVE);
        self.ep_used += cost;
        let ranks = spec.rank_set.ranks();
        let n = idx.len().max(1) as f64;
        // Share of the plan's cost per site (equal shares for an empty plan).
        let share =
            |l: usize| if cost > 0.0 { ranks[idx[l] as usize] as f64 * spec.unit_cost[l] / cost } else { 1.0 / n };
        if c > 1.0 {
            let cc = c.min(rw.violation_cost_cap);
            let reward = -(rw.violation_coef + rw.cost_coef) * cc;
            for (l, r) in site_rewards.iter_mut().enumerate() {
                *r = (reward * share(l)) as f32;
            }
            self.ep_violations += 1;
            self.last_violation = true;
            self.last_cost_ratio = c;
            return RoundOutcome { reward, loss: self.loss, cost_ratio: c, cost, violation: true, skipped: false };
        }
        let k = spec.rank_set.len();
        let eta = self.eta as f32;
        let want_pert = rw.perturbation_coef > 0.0;
        let want_flops = rw.flops_coef > 0.0;
        let mut resid = 0.0f64;
        let mut pert = 0.0f64;
        let mut flops = 0.0f64;
        for l in 0..idx.len() {
            let j = idx[l] as usize;
            let jo = self.rank_idx[l] as usize;
            let e_new = self.energy[l * k + j];
            let mut q = self.captured[l];
            let mut site_pert = 0.0f64;
            if j != jo {
                let e_old = self.energy[l * k + jo];
                if j < jo {
                    q = if e_old > 0.0 { q * (e_new / e_old) } else { 0.0 };
                }
                if want_pert {
                    site_pert = (self.total_energy[l] * (e_new - e_old).abs()).sqrt() as f64;
                    pert += site_pert;
                }
                self.rank_idx[l] = j as u8;
            }
            q += eta * (e_new - q).max(0.0);
            self.captured[l] = q;
            let site_resid = (self.w[l] * (1.0 - q)) as f64;
            resid += site_resid;
            let site_flops = if want_flops { ranks[j] as f64 * spec.flops_per_rank[l] } else { 0.0 };
            flops += site_flops;
            site_rewards[l] = (-p.dynamics.loss_floor / n
                - site_resid
                - rw.cost_coef * c * share(l)
                - rw.flops_coef * site_flops / rw.flops_scale
                - rw.perturbation_coef * site_pert / n) as f32;
        }
        self.loss = p.dynamics.loss_floor + resid;
        let reward =
            -self.loss - rw.cost_coef * c - rw.flops_coef * flops / rw.flops_scale - rw.perturbation_coef * pert / n;
        self.last_violation = false;
        self.last_cost_ratio = c;
        RoundOutcome { reward, loss: self.loss, cost_ratio: c, cost, violation: false, skipped: false }
    }

    /// A skipped round: nothing is sent and nothing is trained, so there is no cost, no progress
    /// and no resize; the reward is the loss carried through the round. Each site is credited
    /// with its own residual plus an equal share of the floor.
    fn play_skip(&mut self, spec: &EnvSpec, site_rewards: &mut [f32]) -> RoundOutcome {
        let n = site_rewards.len().max(1) as f64;
        let floor = spec.preset.dynamics.loss_floor;
        for (l, r) in site_rewards.iter_mut().enumerate() {
            *r = (-floor / n - (self.w[l] * (1.0 - self.captured[l])) as f64) as f32;
        }
        self.ep_skips += 1;
        self.last_violation = false;
        self.last_cost_ratio = 0.0;
        RoundOutcome {
            reward: -self.loss,
            loss: self.loss,
            cost_ratio: 0.0,
            cost: 0.0,
            violation: false,
            skipped: true,
        }
    }

    /// Advances after a round; returns the episode summary when the episode ended (the state is
    /// then already reset).
    fn advance(&mut self, spec: &EnvSpec, env: usize, reward: f64) -> Option<EpisodeSummary> {
        self.ep_return += reward;
        self.round += 1;
        if self.round >= spec.preset.rounds {
            let s = EpisodeSummary {
                env,
                episode_return: self.ep_return,
                final_loss: self.loss,
                resource_used: self.ep_used,
                violations: self.ep_violations,
                skips: self.ep_skips,
                rounds: self.round,
            };
            self.episodes += 1;
            self.reset_episode(spec);
            return Some(s);
        }
        let b = self.budget_ratio(spec);
        self.budget_hist.rotate_right(1);
        self.budget_hist[0] = b;
        self.begin_round(spec);
        None
    }

    /// Builds the oracle's per-(site, rank) value and cost tables for this round and returns the
    /// capacity (the true budget).
    ///
    /// The value of rank r_j at site l is the return of *holding* that rank for the H rounds
    /// left (this one included) under this round's learning rate, as if the plan stayed
    /// feasible: with q₀ the captured share after the resize (shrinking loses the dropped share)
    /// and ρ = 1 − η, the captured share after t rounds is E_j − (E_j − q₀)·ρᵗ, so the summed
    /// loss reduction is w_l·(H·E_j − (E_j − q₀)·S_H) with S_H = Σ_{t=1..H} ρᵗ. Per-round cost
    /// terms (λ·c, FLOPs) count H times, the one-off perturbation once. A one-round horizon
    /// would undervalue rank, because captured energy persists while the cost is paid once.
    pub(crate) fn oracle_tables(&self, spec: &EnvSpec, values: &mut Vec<f64>, costs: &mut Vec<f64>) -> f64 {
        let k = spec.rank_set.len();
        let n = spec.n_sites();
        let rw = &spec.preset.reward;
        let b = self.res.true_budget.max(f64::MIN_POSITIVE);
        values.clear();
        costs.clear();
        let h = spec.preset.rounds.saturating_sub(self.round).max(1) as f64;
        let rho = 1.0 - self.eta;
        let s_h = if self.eta > 0.0 { rho * (1.0 - rho.powf(h)) / self.eta } else { h };
        for l in 0..n {
            let jo = self.rank_idx[l] as usize;
            let e_old = self.energy[l * k + jo] as f64;
            let w = self.w[l] as f64;
            for j in 0..k {
                let e_new = self.energy[l * k + j] as f64;
                let mut q0 = self.captured[l] as f64;
                if j < jo {
                    q0 = if e_old > 0.0 { q0 * (e_new / e_old) } else { 0.0 };
                }
                let r = spec.rank_set.rank(j) as f64;
                let cost = r * spec.unit_cost[l];
                let mut v = w * (h * e_new - (e_new - q0).max(0.0) * s_h)
                    - h * (rw.cost_coef * cost / b + rw.flops_coef * r * spec.flops_per_rank[l] / rw.flops_scale);
                if j != jo && rw.perturbation_coef > 0.0 {
                    v -= rw.perturbation_coef * (self.total_energy[l] as f64 * (e_new - e_old).abs()).sqrt() / n as f64;
                }
                values.push(v);
                costs.push(cost);
            }
        }
        b
    }

    /// The oracle's value of skipping this round, in the units of [`EnvState::oracle_tables`]
    /// summed over the sites: this round keeps the captured share q (no progress, no cost), then
    /// the current plan is held for the H − 1 rounds after it: w_l·(q + (H−1)·E_cur −
    /// (E_cur − q)⁺·S_{H−1}) − (H−1)·(λ·cost/B + FLOPs term). No perturbation: nothing changes.
    pub(crate) fn oracle_skip_value(&self, spec: &EnvSpec) -> f64 {
        let k = spec.rank_set.len();
        let rw = &spec.preset.reward;
        let b = self.res.true_budget.max(f64::MIN_POSITIVE);
        let h = spec.preset.rounds.saturating_sub(self.round).max(1) as f64 - 1.0;
        let rho = 1.0 - self.eta;
        let s_h = if self.eta > 0.0 { rho * (1.0 - rho.powf(h)) / self.eta } else { h };
        (0..spec.n_sites())
            .map(|l| {
                let j = self.rank_idx[l] as usize;
                let e = self.energy[l * k + j] as f64;
                let q = self.captured[l] as f64;
                let r = spec.rank_set.rank(j) as f64;
                self.w[l] as f64 * (q + h * e - (e - q).max(0.0) * s_h)
                    - h * (rw.cost_coef * r * spec.unit_cost[l] / b
                        + rw.flops_coef * r * spec.flops_per_rank[l] / rw.flops_scale)
            })
            .sum()
    }

    /// The round's true budget (privileged).
    pub fn true_budget(&self) -> f64 {
        self.res.true_budget
    }

    /// The round's estimated budget (what the observation implies, no margin).
    pub fn estimated_budget(&self) -> f64 {
        self.res.est_budget
    }

    /// The round's estimated budget after the baselines' safety margin.
    pub fn conservative_budget(&self) -> f64 {
        self.res.safe_budget
    }

    /// Current rank plan.
    pub fn ranks(&self, spec: &EnvSpec) -> Vec<u32> {
        self.rank_idx.iter().map(|&j| spec.rank_set.rank(j as usize)).collect()
    }

    /// Hidden sensitivity weights (privileged; for diagnostics).
    pub fn hidden_weights(&self) -> &[f32] {
        &self.w
    }

    /// Hidden spectral decay exponents (privileged; NaN for calibrated spectra).
    pub fn hidden_betas(&self) -> &[f32] {
        &self.beta
    }

    /// Hidden E(r) table, `n_sites × |rank set|` (privileged).
    pub fn hidden_energy(&self) -> &[f32] {
        &self.energy
    }

    /// Current round (0-based).
    pub fn round(&self) -> u32 {
        self.round
    }

    /// Current loss.
    pub fn loss(&self) -> f64 {
        self.loss
    }

    /// The round's true SNR in dB (channel resource; privileged).
    pub fn true_snr_db(&self) -> f64 {
        self.res.snr_db
    }

    /// The round's SNR estimate in dB (channel resource).
    pub fn snr_estimate_db(&self) -> f64 {
        self.res.snr_est_db
    }
}

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
    solver: MckpSolver,
    scratch_v: Vec<f64>,
    scratch_c: Vec<f64>,
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
            solver: MckpSolver::new(),
            scratch_v: Vec::new(),
            scratch_c: Vec::new(),
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
            && snap.states.iter().all(|s| s.w.len() == n && s.energy.len() == n * spec.rank_set.len());
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
    pub fn context(&self, i: usize) -> crate::policy::RoundContext<'_> {
        let st = &self.states[i];
        crate::policy::RoundContext {
            rank_set: &self.spec.rank_set,
            sites: &self.spec.sites,
            unit_cost: &self.spec.unit_cost,
            resource: self.spec.resource.kind(),
            estimated_budget: st.estimated_budget(),
            conservative_budget: st.conservative_budget(),
            privileged: None,
        }
    }

    /// Like [`VecEnv::context`] plus privileged access (for the oracle and diagnostics).
    pub fn privileged_context(&self, i: usize) -> crate::policy::RoundContext<'_> {
        let mut c = self.context(i);
        c.privileged = Some(crate::policy::Privileged { spec: &self.spec, state: &self.states[i] });
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
        let stats = oracle_plan_into(
            &self.spec,
            &self.states[i],
            &mut self.solver,
            &mut self.scratch_v,
            &mut self.scratch_c,
            &mut out,
        );
        (out, stats)
    }
}

/// The oracle's decision for environment state `st`: `None` when skipping the round is worth
/// more than the best plan (only where skipping is allowed: a channel or a compute budget),
/// else the plan from [`oracle_plan_into`].
pub fn oracle_decide_into(
    spec: &EnvSpec,
    st: &EnvState,
    solver: &mut MckpSolver,
    values: &mut Vec<f64>,
    costs: &mut Vec<f64>,
    out: &mut [u32],
) -> Option<SolveStats> {
    let stats = oracle_plan_into(spec, st, solver, values, costs, out);
    if spec.resource.kind() == ResourceKind::Budget {
        return Some(stats);
    }
    let k = spec.rank_set.len();
    let plan_value: f64 = out
        .iter()
        .enumerate()
        .map(|(l, &r)| values[l * k + spec.rank_set.index_of(r).expect("the oracle plans from the set")])
        .sum();
    (plan_value >= st.oracle_skip_value(spec)).then_some(stats)
}

/// Solves environment state `st`'s round exactly; writes rank values into `out`.
pub fn oracle_plan_into(
    spec: &EnvSpec,
    st: &EnvState,
    solver: &mut MckpSolver,
    values: &mut Vec<f64>,
    costs: &mut Vec<f64>,
    out: &mut [u32],
) -> SolveStats {
    let cap = st.oracle_tables(spec, values, costs);
    let k = spec.rank_set.len();
    let mut choice = vec![0usize; spec.n_sites()];
    match solver.solve(values, costs, k, cap, &mut choice) {
        Some((_, stats)) => {
            for (o, &j) in out.iter_mut().zip(&choice) {
                *o = spec.rank_set.rank(j);
            }
            stats
        }
        None => {
            // Even the cheapest plan does not fit (only if the smallest rank is > 0): take it.
            for o in out.iter_mut() {
                *o = spec.rank_set.rank(0);
            }
            SolveStats::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oracle::brute_force;
    use crate::presets;

    fn small_preset(preset: &str, projections: &str) -> EnvPreset {
        let text = presets::embedded_text(preset).unwrap();
        let text = text
            .lines()
            .map(|l| {
                if l.starts_with("layers =") {
                    "layers = 1".to_string()
                } else if l.starts_with("projections =") {
                    format!("projections = {projections}")
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        presets::from_toml(&text, "small.toml", None).unwrap()
    }

    #[test]
    fn normal_quantile_is_accurate() {
        assert!(normal_quantile(0.5).abs() < 1e-12);
        assert!((normal_quantile(0.975) - 1.959963984540054).abs() < 1e-8);
        assert!((normal_quantile(0.001) + 3.090232306167813).abs() < 1e-7);
    }

    #[test]
    fn oracle_matches_brute_force_on_small_envs() {
        for name in presets::NAMES {
            if name == "llama7b" {
                continue;
            }
            for proj in ["[\"q\", \"v\", \"down\"]", "[\"q\", \"k\", \"v\", \"o\", \"gate\", \"down\"]"] {
                let p = small_preset(name, proj);
                let mut venv = VecEnv::new(&p, 3, 11).unwrap();
                let n = venv.n_sites();
                let k = venv.spec().rank_set.len();
                let mut rng = ChaCha8Rng::seed_from_u64(5);
                for round in 0..12 {
                    for e in 0..venv.n_envs() {
                        let spec = venv.spec().clone();
                        let mut values = Vec::new();
                        let mut costs = Vec::new();
                        let cap = venv.state(e).oracle_tables(&spec, &mut values, &mut costs);
                        let (plan, stats) = venv.oracle_plan(e);
                        assert!(stats.exact);
                        let (bv, _) = brute_force(&values, &costs, k, cap).unwrap();
                        let v: f64 = plan
                            .iter()
                            .enumerate()
                            .map(|(l, &r)| values[l * k + spec.rank_set.index_of(r).unwrap()])
                            .sum();
                        let c = spec.plan_cost(&plan).unwrap();
                        assert!(c <= cap, "{name}: oracle plan over budget");
                        assert!(
                            (v - bv).abs() <= 1e-9 * (1.0 + bv.abs()),
                            "{name} round {round}: oracle {v} brute force {bv}"
                        );
                    }
                    // Random actions (mostly feasible) to reach varied states with shrinks.
                    let rs = venv.spec().rank_set.clone();
                    let plan: Vec<u32> = (0..venv.n_envs() * n)
                        .map(|_| rs.rank(rand::Rng::random_range(&mut rng, 0..k / 2 + 2)))
                        .collect();
                    venv.step(&plan).unwrap();
                }
            }
        }
    }
}

#[cfg(test)]
mod skip_tests {
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
