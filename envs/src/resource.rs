//! Resource models: what a round may spend. Each turns a rank plan into a cost in its own unit
//! (bits, FLOPs, ranks or parameters) and draws the round's true budget and its noisy estimate.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Exp1, StandardNormal};
use serde::{Deserialize, Serialize};

use crate::presets::{
    BudgetConfig, BudgetUnit, ChannelConfig, ComputeConfig, FadingKind, ResourceConfig, ResourceKind,
};
use crate::sites::Site;

/// Thermal noise density, dBm/Hz.
const NOISE_DBM_PER_HZ: f64 = -174.0;

/// Wireless uplink (AirLLM): SNR_t = SNR_mean·10^(S_t/10)·|h_t|²,
/// S_t = ρ·S_{t−1} + √(1−ρ²)·σ_sh·N(0,1) (Gauss–Markov shadowing, dB, stationary from the start),
/// h_t block fading redrawn each round (Rayleigh, or Rician with K-factor: E|h|² = 1 either way).
/// SNR_mean (dB) = P_tx − (PL_1m + 10·n·log10 d) − (−174 + 10·log10 B + NF), with the distance d
/// drawn per episode. Budget: B·log2(1 + SNR)·deadline bits.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChannelModel {
    /// The preset section.
    pub cfg: ChannelConfig,
}

impl ChannelModel {
    /// One draw of the fading power gain |h|² (mean 1).
    pub fn sample_fading_power(&self, rng: &mut ChaCha8Rng) -> f64 {
        match self.cfg.fading {
            FadingKind::None => 1.0,
            FadingKind::Rayleigh => Exp1.sample(rng),
            FadingKind::Rician => {
                let k = self.cfg.k_factor;
                let los = (k / (k + 1.0)).sqrt();
                let s = (0.5 / (k + 1.0)).sqrt();
                let x: f64 = StandardNormal.sample(rng);
                let y: f64 = StandardNormal.sample(rng);
                (los + s * x).powi(2) + (s * y).powi(2)
            }
        }
    }

    /// One Gauss–Markov shadowing step (dB).
    pub fn next_shadowing(&self, prev_db: f64, rng: &mut ChaCha8Rng) -> f64 {
        let rho = self.cfg.shadowing_rho;
        let n: f64 = StandardNormal.sample(rng);
        rho * prev_db + (1.0 - rho * rho).sqrt() * self.cfg.shadowing_std_db * n
    }

    /// Mean SNR (dB) at distance `d_m` and bandwidth `b_hz` from the path-loss model.
    pub fn mean_snr_db(&self, d_m: f64, b_hz: f64) -> f64 {
        let c = &self.cfg;
        let pl = c.path_loss_ref_db + 10.0 * c.path_loss_exponent * d_m.log10();
        let noise = NOISE_DBM_PER_HZ + 10.0 * b_hz.log10() + c.noise_figure_db;
        c.tx_power_dbm - pl - noise
    }

    /// Bits deliverable within the deadline at `snr_db` over `b_hz`: B·log2(1 + SNR)·T.
    pub fn budget_bits(&self, snr_db: f64, b_hz: f64) -> f64 {
        b_hz * (1.0 + 10f64.powf(snr_db / 10.0)).log2() * self.cfg.deadline_s
    }
}

/// Compute/latency model (DR-RL): ln throughput follows a stationary Gauss–Markov process
/// around ln(mean) − σ²/2 (so the mean throughput is the configured one); budget =
/// throughput·latency budget FLOPs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ComputeModel {
    /// The preset section.
    pub cfg: ComputeConfig,
}

impl ComputeModel {
    /// FLOPs per unit of rank at a site: multiplier · 2 · tokens · (d_in + d_out).
    pub fn flops_per_rank(&self, site: &Site) -> f64 {
        self.cfg.flops_multiplier * 2.0 * self.cfg.tokens_per_round * site.params_per_rank() as f64
    }
}

/// AdaLoRA budget with its cubic schedule.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BudgetModel {
    /// The preset section.
    pub cfg: BudgetConfig,
}

impl BudgetModel {
    /// Average rank per site allowed in round `t` of `rounds` (AdaLoRA's `budget_schedule`).
    pub fn avg_rank(&self, t: u32, rounds: u32) -> f64 {
        let c = &self.cfg;
        let end = rounds.saturating_sub(c.final_rounds);
        if t < c.warmup_rounds || end <= c.warmup_rounds {
            return if t >= end { c.target_avg_rank } else { c.initial_avg_rank };
        }
        if t >= end {
            return c.target_avg_rank;
        }
        let frac = (t - c.warmup_rounds) as f64 / (end - c.warmup_rounds) as f64;
        c.target_avg_rank + (c.initial_avg_rank - c.target_avg_rank) * (1.0 - frac).powi(3)
    }
}

/// A resource model, built from the preset.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ResourceModel {
    /// Wireless uplink.
    Channel(ChannelModel),
    /// Compute/latency.
    Compute(ComputeModel),
    /// Fixed budget.
    Budget(BudgetModel),
}

/// Per-environment resource state (serializable, part of the environment state).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResourceState {
    /// Episode's mean SNR, dB (channel).
    pub mean_snr_db: f64,
    /// Episode's bandwidth, Hz (channel).
    pub bandwidth_hz: f64,
    /// Shadowing, dB (channel).
    pub shadowing_db: f64,
    /// Deviation of ln throughput from its mean (compute).
    pub log_throughput_dev: f64,
    /// This round's true SNR, dB (channel; 0 otherwise).
    pub snr_db: f64,
    /// This round's SNR estimate, dB (channel; 0 otherwise).
    pub snr_est_db: f64,
    /// This round's true budget (bits, FLOPs, ranks or parameters).
    pub true_budget: f64,
    /// This round's estimated budget (from the noisy estimate, no safety margin).
    pub est_budget: f64,
    /// This round's estimated budget after the baselines' safety margin.
    pub safe_budget: f64,
}

impl ResourceModel {
    /// Builds the model named by `cfg.kind` (the preset has been validated).
    pub fn new(cfg: &ResourceConfig) -> Self {
        match cfg.kind {
            ResourceKind::Channel => {
                ResourceModel::Channel(ChannelModel { cfg: cfg.channel.clone().expect("validated") })
            }
            ResourceKind::Compute => {
                ResourceModel::Compute(ComputeModel { cfg: cfg.compute.clone().expect("validated") })
            }
            ResourceKind::Budget => ResourceModel::Budget(BudgetModel { cfg: cfg.budget.clone().expect("validated") }),
        }
    }

    /// Which kind.
    pub fn kind(&self) -> ResourceKind {
        match self {
            ResourceModel::Channel(_) => ResourceKind::Channel,
            ResourceModel::Compute(_) => ResourceKind::Compute,
            ResourceModel::Budget(_) => ResourceKind::Budget,
        }
    }

    /// Cost of one unit of rank at `site`, in this model's budget unit.
    pub fn unit_cost(&self, site: &Site) -> f64 {
        match self {
            ResourceModel::Channel(c) => site.params_per_rank() as f64 * c.cfg.bits_per_param,
            ResourceModel::Compute(c) => c.flops_per_rank(site),
            ResourceModel::Budget(b) => match b.cfg.unit {
                BudgetUnit::Rank => 1.0,
                BudgetUnit::Params => site.params_per_rank() as f64,
            },
        }
    }

    /// Starts an episode: draws distance, bandwidth and a stationary shadowing/load state.
    pub fn reset(&self, st: &mut ResourceState, rng: &mut ChaCha8Rng) {
        *st = ResourceState::default();
        match self {
            ResourceModel::Channel(c) => {
                let [lo, hi] = c.cfg.distance_m;
                let d = if hi > lo { rng.random_range(lo..hi) } else { lo };
                st.bandwidth_hz = c.cfg.bandwidth_hz[rng.random_range(0..c.cfg.bandwidth_hz.len())];
                st.mean_snr_db = c.mean_snr_db(d, st.bandwidth_hz);
                let n: f64 = StandardNormal.sample(rng);
                st.shadowing_db = c.cfg.shadowing_std_db * n;
            }
            ResourceModel::Compute(c) => {
                let n: f64 = StandardNormal.sample(rng);
                st.log_throughput_dev = c.cfg.throughput_log_std * n;
            }
            ResourceModel::Budget(_) => {}
        }
    }

    /// Draws round `t`'s true budget and its estimate. The first round uses the stationary
    /// state drawn at reset; later rounds advance the Gauss–Markov processes first.
    pub fn draw_round(
        &self,
        st: &mut ResourceState,
        t: u32,
        rounds: u32,
        margin: f64,
        sum_unit_cost: f64,
        rng: &mut ChaCha8Rng,
    ) {
        match self {
            ResourceModel::Channel(c) => {
                if t > 0 {
                    st.shadowing_db = c.next_shadowing(st.shadowing_db, rng);
                }
                let g = c.sample_fading_power(rng).max(1e-12);
                st.snr_db = st.mean_snr_db + st.shadowing_db + 10.0 * g.log10();
                let n: f64 = StandardNormal.sample(rng);
                st.snr_est_db = st.snr_db + c.cfg.estimate_noise_db * n;
                st.true_budget = c.budget_bits(st.snr_db, st.bandwidth_hz);
                st.est_budget = c.budget_bits(st.snr_est_db, st.bandwidth_hz);
                st.safe_budget = c.budget_bits(st.snr_est_db - margin, st.bandwidth_hz);
            }
            ResourceModel::Compute(c) => {
                let cfg = &c.cfg;
                if t > 0 {
                    let n: f64 = StandardNormal.sample(rng);
                    let rho = cfg.throughput_rho;
                    st.log_throughput_dev =
                        rho * st.log_throughput_dev + (1.0 - rho * rho).sqrt() * cfg.throughput_log_std * n;
                }
                let base = cfg.throughput_flops.ln() - 0.5 * cfg.throughput_log_std.powi(2);
                let n: f64 = StandardNormal.sample(rng);
                let est_dev = st.log_throughput_dev + cfg.estimate_noise * n;
                st.true_budget = (base + st.log_throughput_dev).exp() * cfg.latency_budget_s;
                st.est_budget = (base + est_dev).exp() * cfg.latency_budget_s;
                st.safe_budget = st.est_budget * (1.0 - margin).max(0.0);
            }
            ResourceModel::Budget(b) => {
                st.true_budget = b.avg_rank(t, rounds) * sum_unit_cost;
                st.est_budget = st.true_budget;
                st.safe_budget = st.true_budget;
            }
        }
    }
}
