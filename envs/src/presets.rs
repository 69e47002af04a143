//! Environment presets: the TOML schema, its range checks, and the embedded preset files.
//!
//! Every coefficient of the simulator lives here. Presets are strict (`deny_unknown_fields`) and
//! validated through [`rankpilot_config`], so an error names the file, the dotted key and what is
//! allowed.

use std::path::{Path, PathBuf};

use rankpilot_config::{Validate, Violations};
use serde::{Deserialize, Serialize};

use crate::EnvError;
use crate::calibration::Calibration;
use crate::sites::Role;

/// A whole environment preset (one TOML file).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvPreset {
    /// Preset name (e.g. `wireless-rayleigh`).
    pub name: String,
    /// One-line description.
    #[serde(default)]
    pub description: String,
    /// Rounds per episode (fixed episode length).
    pub rounds: u32,
    /// Allowed LoRA ranks.
    pub ranks: Vec<u32>,
    /// Which sites exist and their shapes.
    pub sites: SitesConfig,
    /// Hidden update spectra.
    pub spectrum: SpectrumConfig,
    /// Hidden per-site loss sensitivity weights.
    pub sensitivity: SensitivityConfig,
    /// Progress dynamics and the data stream.
    pub dynamics: DynamicsConfig,
    /// The constrained resource.
    pub resource: ResourceConfig,
    /// Reward coefficients.
    pub reward: RewardConfig,
    /// Observation noise levels.
    pub observation: ObservationConfig,
    /// Baseline settings.
    pub baselines: BaselineConfig,
    /// Calibration data resolved from `sites.calibration` at load time.
    #[serde(skip)]
    pub calibration_data: Option<Calibration>,
}

/// Site layout: either a generated Llama layout (`layers`, `hidden`, `intermediate`,
/// `projections`) or a calibration file (`calibration`, a path relative to the preset file).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SitesConfig {
    /// Number of decoder layers.
    pub layers: Option<u32>,
    /// Model (hidden) width.
    pub hidden: Option<u32>,
    /// MLP intermediate width.
    pub intermediate: Option<u32>,
    /// Adapted projections per layer.
    #[serde(default = "default_projections")]
    pub projections: Vec<Role>,
    /// Calibration JSON (sites, shapes, spectra, sensitivities); replaces the generated layout.
    pub calibration: Option<String>,
    /// γ: every calibrated singular value σ_k becomes σ_k^γ (default 1, unchanged; only with
    /// `calibration`). A short high-rank probe concentrates a site's update in a few directions,
    /// so its spectra say that rank 8 holds nearly all of the energy while real runs still gain
    /// from 8 to 16; γ < 1 flattens the spectra, and [`crate::calibration::fit_spectrum_exponent`]
    /// fits γ to the final losses of real runs at several uniform ranks.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub spectrum_exponent: f64,
}

fn is_one(x: &f64) -> bool {
    *x == 1.0
}

fn default_projections() -> Vec<Role> {
    vec![Role::Q, Role::K, Role::V, Role::O, Role::Gate, Role::Up, Role::Down]
}

/// A number per projection role.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleTable {
    /// q_proj.
    pub q: f64,
    /// k_proj.
    pub k: f64,
    /// v_proj.
    pub v: f64,
    /// o_proj.
    pub o: f64,
    /// gate_proj.
    pub gate: f64,
    /// up_proj.
    pub up: f64,
    /// down_proj.
    pub down: f64,
    /// Any other module.
    #[serde(default = "one")]
    pub other: f64,
}

fn one() -> f64 {
    1.0
}

impl RoleTable {
    /// The value for `role`.
    pub fn get(&self, role: Role) -> f64 {
        match role {
            Role::Q => self.q,
            Role::K => self.k,
            Role::V => self.v,
            Role::O => self.o,
            Role::Gate => self.gate,
            Role::Up => self.up,
            Role::Down => self.down,
            Role::Other => self.other,
        }
    }
    fn all(&self) -> [f64; 8] {
        Role::ALL.map(|r| self.get(r))
    }
}

/// Hidden spectra: σ_k = a·k^(−β) with β = `beta[role]` + beta_depth_slope·(depth − 0.5) +
/// N(0, beta_jitter²), clipped to [beta_min, beta_max], and ln a ~ N(0, scale_log_std²); drawn
/// per site per episode. With a calibration file the file's spectra are used instead.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpectrumConfig {
    /// Mean decay exponent per role (the structure a policy can learn from the module kind).
    pub beta: RoleTable,
    /// Change of β from the first to the last layer.
    pub beta_depth_slope: f64,
    /// Per-site, per-episode standard deviation of β.
    pub beta_jitter: f64,
    /// Lower clip for β.
    pub beta_min: f64,
    /// Upper clip for β.
    pub beta_max: f64,
    /// Standard deviation of ln a (the scale only matters for the perturbation term).
    pub scale_log_std: f64,
}

/// Hidden sensitivity weights w_l: w ∝ `by_role[role]`·exp(depth_slope·(depth − 0.5) +
/// N(0, log_std²)), normalised so Σ_l w_l = total.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SensitivityConfig {
    /// Σ_l w_l: the loss above the floor at the start of an episode.
    pub total: f64,
    /// Relative mean weight per role.
    pub by_role: RoleTable,
    /// Log-weight change from first to last layer.
    pub depth_slope: f64,
    /// Per-site, per-episode log-normal jitter.
    pub log_std: f64,
}

/// Progress dynamics and the data stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DynamicsConfig {
    /// Fraction of the gap to the floor closed by the first successful round (η); with
    /// `decay_exponent` unset, by every successful round.
    pub learning_rate: f64,
    /// The law of a site's progress in the rounds it trained, k: unset, its gap shrinks as
    /// (1 − η)^k (an exponential); set to α > 0, as (1 + k·c/α)^(−α) with c = −ln(1 − η), a
    /// power law in k with the same first round, which tends to the exponential as α → ∞
    /// ([`DynamicsConfig::round_rate`]; k is the site's age, [`DynamicsConfig::age_of_gap`], so a
    /// grown site's new capacity starts fresh). Real fine-tuning losses follow such a power law
    /// in steps, so late rounds still gain where the exponential says they gain nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decay_exponent: Option<f64>,
    /// Irreducible loss L∞.
    pub loss_floor: f64,
    /// η_t = η·(1 − entropy_effect·(entropy_t − entropy_mean)): harder batches learn slower.
    pub entropy_effect: f64,
    /// Mean normalised token entropy of a batch, in [0, 1].
    pub entropy_mean: f64,
    /// Stationary standard deviation of the token entropy.
    pub entropy_std: f64,
    /// Mean OOV rate.
    pub oov_mean: f64,
    /// Stationary standard deviation of the OOV rate.
    pub oov_std: f64,
    /// Round-to-round correlation of the data proxies, in [0, 1).
    pub data_rho: f64,
}

/// Which resource constrains a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResourceKind {
    /// Wireless uplink: bits against capacity × deadline (AirLLM).
    Channel,
    /// FLOPs against throughput × latency budget (DR-RL).
    Compute,
    /// A fixed total-rank or parameter budget (AdaLoRA).
    Budget,
}

/// The resource model; exactly the section named by `kind` must be present.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceConfig {
    /// Which model.
    pub kind: ResourceKind,
    /// Settings for `kind = "channel"`.
    pub channel: Option<ChannelConfig>,
    /// Settings for `kind = "compute"`.
    pub compute: Option<ComputeConfig>,
    /// Settings for `kind = "budget"`.
    pub budget: Option<BudgetConfig>,
}

/// Small-scale fading distribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FadingKind {
    /// |h|² ~ Exp(1).
    Rayleigh,
    /// Line-of-sight component with power K/(K+1) plus scattered CN(0, 1/(K+1)).
    Rician,
    /// |h|² = 1.
    None,
}

/// Wireless channel: SNR_t = SNR_mean · 10^(S_t/10) · |h_t|², with S_t Gauss–Markov shadowing
/// (dB) and h_t block fading redrawn every round; capacity C = B·log2(1 + SNR).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelConfig {
    /// Fading distribution.
    pub fading: FadingKind,
    /// Rician K-factor (linear, LOS/scatter power ratio), >= 0; ignored unless rician.
    #[serde(default)]
    pub k_factor: f64,
    /// Stationary standard deviation of the shadowing, dB.
    pub shadowing_std_db: f64,
    /// Round-to-round shadowing correlation ρ, in [0, 1).
    pub shadowing_rho: f64,
    /// Transmit power, dBm.
    pub tx_power_dbm: f64,
    /// Path loss at 1 m, dB.
    pub path_loss_ref_db: f64,
    /// Path-loss exponent.
    pub path_loss_exponent: f64,
    /// Device distance range [min, max] in m, drawn uniformly per episode.
    pub distance_m: [f64; 2],
    /// Receiver noise figure, dB (noise power = −174 dBm/Hz + 10·log10 B + NF).
    pub noise_figure_db: f64,
    /// Bandwidths (Hz); one is drawn per episode.
    pub bandwidth_hz: Vec<f64>,
    /// Round deadline, s.
    pub deadline_s: f64,
    /// Bits per transmitted parameter.
    pub bits_per_param: f64,
    /// Standard deviation of the observed SNR estimate around the truth, dB.
    pub estimate_noise_db: f64,
}

/// Compute/latency model (DR-RL): the LoRA path of site l at rank r costs
/// flops_multiplier · 2 · tokens_per_round · r · (d_in + d_out) FLOPs; the device delivers
/// throughput_t FLOP/s (log-normal Gauss–Markov around the mean) within the latency budget.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComputeConfig {
    /// Tokens processed per round.
    pub tokens_per_round: f64,
    /// Forward + backward multiplier (3 = forward and two backward matmuls).
    pub flops_multiplier: f64,
    /// Mean throughput left for the adapters, FLOP/s.
    pub throughput_flops: f64,
    /// Stationary standard deviation of ln throughput (background load).
    pub throughput_log_std: f64,
    /// Round-to-round correlation of ln throughput, in [0, 1).
    pub throughput_rho: f64,
    /// Latency budget per round, s.
    pub latency_budget_s: f64,
    /// Standard deviation of the observed ln-throughput estimate.
    pub estimate_noise: f64,
}

/// What a fixed budget counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BudgetUnit {
    /// Σ_l r_l (AdaLoRA's triplet count).
    Rank,
    /// Σ_l r_l·(d_in + d_out).
    Params,
}

/// AdaLoRA budget: average rank per site decays from `initial_avg_rank` to `target_avg_rank`
/// along AdaLoRA's cubic schedule (flat for `warmup_rounds`, frozen for the last
/// `final_rounds`). The budget is known exactly (no noise).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    /// What the budget counts.
    pub unit: BudgetUnit,
    /// Average rank per site at the start.
    pub initial_avg_rank: f64,
    /// Average rank per site at the end.
    pub target_avg_rank: f64,
    /// Rounds at the initial budget.
    pub warmup_rounds: u32,
    /// Rounds at the target budget at the end.
    pub final_rounds: u32,
}

/// Reward coefficients. Feasible round: r = −loss − cost_coef·c − flops_coef·F/flops_scale −
/// perturbation_coef·P (with `loss_term = "final"`, the round's progress, loss before − loss
/// after, in place of −loss). Violation (c > 1): r = −violation_coef·c' − cost_coef·c', with
/// c' = min(c, violation_cost_cap), and nothing changes that round.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardConfig {
    /// λ: weight of the cost ratio c = required/available.
    pub cost_coef: f64,
    /// AirLLM's violation multiplier (10).
    pub violation_coef: f64,
    /// Cap on c inside the violation penalty (keeps returns bounded in deep fades).
    pub violation_cost_cap: f64,
    /// DR-RL FLOPs term weight (0 = off).
    #[serde(default)]
    pub flops_coef: f64,
    /// FLOPs are divided by this before weighting (DR-RL uses 1e9).
    #[serde(default = "giga")]
    pub flops_scale: f64,
    /// DR-RL perturbation term weight (0 = off); P = mean over sites of ‖ΔA‖_F.
    #[serde(default)]
    pub perturbation_coef: f64,
    /// Which loss the reward charges (default `every-round`).
    #[serde(default, skip_serializing_if = "LossTerm::is_every_round")]
    pub loss_term: LossTerm,
}

/// Which loss the reward charges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossTerm {
    /// −loss every round (AirLLM, DR-RL): the return sums the loss curve, so early progress
    /// counts many times and the last rounds little.
    #[default]
    EveryRound,
    /// The loss the episode ends at, paid as each round's progress (the loss before the round
    /// minus the loss after it; 0 for a skipped or lost round): the return is the initial minus
    /// the final loss, less the costs, as a fine-tuning run is judged by its last validation loss.
    Final,
}

impl LossTerm {
    /// Whether this is the default, `every-round` (not written out).
    pub fn is_every_round(&self) -> bool {
        *self == LossTerm::EveryRound
    }
}

fn giga() -> f64 {
    1e9
}

/// Observation settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObservationConfig {
    /// Log-normal noise (std of ln) on the per-site sensitivity estimate.
    pub sensitivity_noise: f64,
    /// Log-normal noise on the per-site gradient-norm estimate.
    pub grad_noise: f64,
    /// Log-normal noise on the per-site tail-energy share.
    pub tail_noise: f64,
    /// The first round shows no measured sensitivity or gradient norm: every site reads 1, their
    /// mean, as in a real run whose adapters start from B = 0 (nothing trained, nothing measured
    /// yet). Off by default: the simulator reveals them from the first round.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unmeasured_first_round: bool,
    /// Exponent γ of the sensitivity in the gradient-norm reading: a site reads
    /// w^γ·√(residual), with the w^γ rescaled to the sensitivities' total. 1 (the default) is the
    /// model's own reading; a real run's gradient norms are flatter across sites than its
    /// sensitivities (γ < 1), which `calibrate` can measure.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub grad_exponent: f64,
    /// Factor on the tail-energy share a site reads (clipped to 1). 1 (the default) reads the
    /// spectrum's own share; a real adapter trained for a few rounds concentrates its energy in
    /// its leading directions, so its smallest singular value holds less than the spectrum's
    /// (factor < 1).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub tail_scale: f64,
}

/// Baseline settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaselineConfig {
    /// Safety backoff the baselines apply to the estimated budget: dB off the SNR estimate for
    /// `channel`; fraction off the estimated budget for `compute` (ignored for `budget`).
    pub margin: f64,
    /// The common spectral decay the AdaLoRA-style baseline assumes for every site.
    pub adalora_beta: f64,
}

fn role_table_ok(v: &mut Violations, key: &str, t: &RoleTable, ok: impl Fn(f64) -> bool, allowed: &str) {
    for (role, val) in Role::ALL.iter().zip(t.all()) {
        v.check(ok(val), &format!("{key}.{}", role.name()), val, allowed);
    }
}

impl Validate for EnvPreset {
    fn validate(&self, v: &mut Violations) {
        v.check(!self.name.is_empty(), "name", &self.name, "a non-empty name");
        v.check((1..=100_000).contains(&self.rounds), "rounds", self.rounds, "an integer in [1, 100000]");
        let mut sorted = self.ranks.clone();
        sorted.sort_unstable();
        sorted.dedup();
        v.check(
            !self.ranks.is_empty() && sorted.len() == self.ranks.len() && self.ranks.len() <= 255,
            "ranks",
            &self.ranks,
            "a non-empty list of distinct ranks (at most 255)",
        );
        v.nested("sites", &self.sites);
        v.nested("spectrum", &self.spectrum);
        v.nested("sensitivity", &self.sensitivity);
        v.nested("dynamics", &self.dynamics);
        v.nested("resource", &self.resource);
        v.nested("reward", &self.reward);
        v.nested("observation", &self.observation);
        v.nested("baselines", &self.baselines);
        // The oracle only searches feasible plans; that is optimal when every feasible plan
        // (even all ranks 0, loss at most floor + total) beats the smallest violation penalty.
        v.check(
            self.dynamics.loss_floor + self.sensitivity.total < self.reward.violation_coef,
            "reward.violation_coef",
            self.reward.violation_coef,
            "a number > dynamics.loss_floor + sensitivity.total (a violation must cost more than any feasible round)",
        );
    }
}

impl Validate for SitesConfig {
    fn validate(&self, v: &mut Violations) {
        let generated = self.layers.is_some() || self.hidden.is_some() || self.intermediate.is_some();
        v.check(
            self.spectrum_exponent.is_finite()
                && self.spectrum_exponent > 0.0
                && self.spectrum_exponent <= 4.0
                && (self.spectrum_exponent == 1.0 || self.calibration.is_some()),
            "spectrum_exponent",
            self.spectrum_exponent,
            "a number in (0, 4], other than 1 only with `calibration`",
        );
        if self.calibration.is_some() {
            v.check(
                !generated,
                "calibration",
                &self.calibration,
                "either `calibration` or `layers`/`hidden`/`intermediate`, not both",
            );
        } else {
            v.check(
                matches!(self.layers, Some(1..=4096)),
                "layers",
                self.layers,
                "an integer in [1, 4096] (or set `calibration`)",
            );
            v.check(matches!(self.hidden, Some(1..=1_048_576)), "hidden", self.hidden, "an integer in [1, 1048576]");
            v.check(
                matches!(self.intermediate, Some(1..=1_048_576)),
                "intermediate",
                self.intermediate,
                "an integer in [1, 1048576]",
            );
            v.check(
                !self.projections.is_empty(),
                "projections",
                &self.projections,
                "a non-empty list of q, k, v, o, gate, up, down, other",
            );
        }
    }
}

impl Validate for SpectrumConfig {
    fn validate(&self, v: &mut Violations) {
        role_table_ok(v, "beta", &self.beta, |b| b > 0.0 && b <= 10.0, "a number in (0, 10]");
        v.check(
            (0.0..=5.0).contains(&self.beta_jitter),
            "beta_jitter",
            self.beta_jitter,
            "a number >= 0 and <= 5 (a standard deviation)",
        );
        v.check(
            self.beta_min > 0.0 && self.beta_min <= self.beta_max && self.beta_max <= 10.0,
            "beta_min",
            [self.beta_min, self.beta_max],
            "0 < beta_min <= beta_max <= 10",
        );
        v.check(
            self.beta_depth_slope.abs() <= 10.0,
            "beta_depth_slope",
            self.beta_depth_slope,
            "a number in [-10, 10]",
        );
        v.check(
            (0.0..=5.0).contains(&self.scale_log_std),
            "scale_log_std",
            self.scale_log_std,
            "a number >= 0 and <= 5 (a log-scale standard deviation)",
        );
    }
}

impl Validate for SensitivityConfig {
    fn validate(&self, v: &mut Violations) {
        v.check(self.total > 0.0 && self.total <= 1e6, "total", self.total, "a number in (0, 1e6]");
        role_table_ok(v, "by_role", &self.by_role, |b| b > 0.0 && b <= 1e6, "a number in (0, 1e6]");
        v.check(self.depth_slope.abs() <= 10.0, "depth_slope", self.depth_slope, "a number in [-10, 10]");
        v.check(
            (0.0..=5.0).contains(&self.log_std),
            "log_std",
            self.log_std,
            "a number >= 0 and <= 5 (a log-scale standard deviation)",
        );
    }
}

impl DynamicsConfig {
    /// The share of its gap that a site of age `age` closes in one trained round, before the
    /// entropy effect: η for the exponential law; 1 − G(a+1)/G(a) with G(a) = (1 + a·c/α)^(−α),
    /// c = −ln(1 − η), for the power law. A site's age is the number of rounds a site training
    /// from nothing at its current capacity would have needed to leave its gap ([`Self::age_of_gap`]):
    /// at one rank from the start it is the rounds it trained; a grown site is younger, since its
    /// new components start fresh.
    pub fn round_rate(&self, age: f64) -> f64 {
        match self.decay_exponent {
            None => self.learning_rate,
            Some(alpha) => {
                let c = -(1.0 - self.learning_rate).ln();
                if !c.is_finite() {
                    return 1.0;
                }
                if !age.is_finite() {
                    return 0.0;
                }
                1.0 - ((1.0 + age * c / alpha) / (1.0 + (age + 1.0) * c / alpha)).powf(alpha)
            }
        }
    }

    /// The age (see [`Self::round_rate`]) of a site whose gap to its capacity is the share `gap` of
    /// that capacity: G⁻¹(gap) = (gap^(−1/α) − 1)·α/c for the power law (infinite at gap 0), 0 for
    /// the exponential, whose rate does not depend on it.
    pub fn age_of_gap(&self, gap: f64) -> f64 {
        match self.decay_exponent {
            None => 0.0,
            Some(alpha) => {
                let c = -(1.0 - self.learning_rate).ln();
                if !c.is_finite() || gap >= 1.0 {
                    return 0.0;
                }
                (gap.max(0.0).powf(-1.0 / alpha) - 1.0) * alpha / c
            }
        }
    }
}

impl Validate for DynamicsConfig {
    fn validate(&self, v: &mut Violations) {
        v.check(
            self.learning_rate > 0.0 && self.learning_rate <= 1.0,
            "learning_rate",
            self.learning_rate,
            "a number in (0, 1]",
        );
        if let Some(alpha) = self.decay_exponent {
            v.check(
                alpha > 0.0 && alpha <= 1e6,
                "decay_exponent",
                alpha,
                "a number > 0 and <= 1e6 (the power law's exponent; leave it out for the exponential)",
            );
        }
        v.check((0.0..=1e6).contains(&self.loss_floor), "loss_floor", self.loss_floor, "a number >= 0 and <= 1e6");
        v.check(
            (0.0..=1.0).contains(&self.entropy_effect),
            "entropy_effect",
            self.entropy_effect,
            "a number in [0, 1]",
        );
        v.check((0.0..=1.0).contains(&self.entropy_mean), "entropy_mean", self.entropy_mean, "a number in [0, 1]");
        v.check(
            (0.0..=1.0).contains(&self.entropy_std),
            "entropy_std",
            self.entropy_std,
            "a number >= 0 and <= 1 (a standard deviation)",
        );
        v.check((0.0..=1.0).contains(&self.oov_mean), "oov_mean", self.oov_mean, "a number in [0, 1]");
        v.check(
            (0.0..=1.0).contains(&self.oov_std),
            "oov_std",
            self.oov_std,
            "a number >= 0 and <= 1 (a standard deviation)",
        );
        v.check((0.0..1.0).contains(&self.data_rho), "data_rho", self.data_rho, "a number in [0, 1)");
    }
}

impl Validate for ResourceConfig {
    fn validate(&self, v: &mut Violations) {
        let (need, present) = match self.kind {
            ResourceKind::Channel => ("channel", self.channel.is_some()),
            ResourceKind::Compute => ("compute", self.compute.is_some()),
            ResourceKind::Budget => ("budget", self.budget.is_some()),
        };
        v.check(present, need, "missing", &format!("a [resource.{need} section because kind = \"{need}\""));
        if let Some(c) = &self.channel {
            v.nested("channel", c);
        }
        if let Some(c) = &self.compute {
            v.nested("compute", c);
        }
        if let Some(c) = &self.budget {
            v.nested("budget", c);
        }
    }
}

impl Validate for ChannelConfig {
    fn validate(&self, v: &mut Violations) {
        v.check(
            (0.0..=1e6).contains(&self.k_factor),
            "k_factor",
            self.k_factor,
            "a number >= 0 and <= 1e6 (linear K-factor)",
        );
        v.check(
            (0.0..=40.0).contains(&self.shadowing_std_db),
            "shadowing_std_db",
            self.shadowing_std_db,
            "a number >= 0 and <= 40 (a standard deviation, dB)",
        );
        v.check((0.0..1.0).contains(&self.shadowing_rho), "shadowing_rho", self.shadowing_rho, "a number in [0, 1)");
        v.check(
            self.path_loss_exponent > 0.0 && self.path_loss_exponent <= 10.0,
            "path_loss_exponent",
            self.path_loss_exponent,
            "a number in (0, 10",
        );
        v.check(
            self.distance_m[0] > 0.0 && self.distance_m[0] <= self.distance_m[1] && self.distance_m[1] <= 1e7,
            "distance_m",
            self.distance_m,
            "[min, max] with 0 < min <= max <= 1e7",
        );
        v.check(
            !self.bandwidth_hz.is_empty() && self.bandwidth_hz.iter().all(|b| *b > 0.0 && *b <= 1e12),
            "bandwidth_hz",
            &self.bandwidth_hz,
            "a non-empty list of numbers in (0, 1e12]",
        );
        v.check(self.deadline_s > 0.0 && self.deadline_s <= 1e6, "deadline_s", self.deadline_s, "a number in (0, 1e6]");
        v.check(
            self.bits_per_param > 0.0 && self.bits_per_param <= 64.0,
            "bits_per_param",
            self.bits_per_param,
            "a number in (0, 64]",
        );
        v.check(
            (0.0..=40.0).contains(&self.estimate_noise_db),
            "estimate_noise_db",
            self.estimate_noise_db,
            "a number >= 0 and <= 40 (a standard deviation, dB)",
        );
        for (k, x) in [
            ("tx_power_dbm", self.tx_power_dbm),
            ("path_loss_ref_db", self.path_loss_ref_db),
            ("noise_figure_db", self.noise_figure_db),
        ] {
            v.check(x.abs() <= 300.0, k, x, "a number in [-300, 300] (dB)");
        }
    }
}

impl Validate for ComputeConfig {
    fn validate(&self, v: &mut Violations) {
        v.check(
            self.tokens_per_round > 0.0 && self.tokens_per_round <= 1e12,
            "tokens_per_round",
            self.tokens_per_round,
            "a number in (0, 1e12]",
        );
        v.check(
            self.flops_multiplier > 0.0 && self.flops_multiplier <= 1e6,
            "flops_multiplier",
            self.flops_multiplier,
            "a number in (0, 1e6]",
        );
        v.check(
            self.throughput_flops > 0.0 && self.throughput_flops <= 1e24,
            "throughput_flops",
            self.throughput_flops,
            "a number in (0, 1e24]",
        );
        v.check(
            (0.0..=5.0).contains(&self.throughput_log_std),
            "throughput_log_std",
            self.throughput_log_std,
            "a number >= 0 and <= 5 (a log-scale standard deviation)",
        );
        v.check((0.0..1.0).contains(&self.throughput_rho), "throughput_rho", self.throughput_rho, "a number in [0, 1)");
        v.check(
            self.latency_budget_s > 0.0 && self.latency_budget_s <= 1e6,
            "latency_budget_s",
            self.latency_budget_s,
            "a number in (0, 1e6",
        );
        v.check(
            (0.0..=5.0).contains(&self.estimate_noise),
            "estimate_noise",
            self.estimate_noise,
            "a number >= 0 and <= 5 (a standard deviation)",
        );
    }
}

impl Validate for BudgetConfig {
    fn validate(&self, v: &mut Violations) {
        v.check(
            self.initial_avg_rank > 0.0 && self.initial_avg_rank <= 1e6,
            "initial_avg_rank",
            self.initial_avg_rank,
            "a number in (0, 1e6]",
        );
        v.check(
            self.target_avg_rank > 0.0 && self.target_avg_rank <= self.initial_avg_rank,
            "target_avg_rank",
            self.target_avg_rank,
            "a positive number <= initial_avg_rank",
        );
    }
}

impl Validate for RewardConfig {
    fn validate(&self, v: &mut Violations) {
        // Reward terms are sums of these times quantities of order 1: above 1e6 they swamp the
        // loss and, summed over rounds and sites, leave f32's range.
        for (k, x) in [
            ("cost_coef", self.cost_coef),
            ("violation_coef", self.violation_coef),
            ("flops_coef", self.flops_coef),
            ("perturbation_coef", self.perturbation_coef),
        ] {
            v.check((0.0..=1e6).contains(&x), k, x, "a number >= 0 and <= 1e6");
        }
        v.check(
            (1.0..=1e6).contains(&self.violation_cost_cap),
            "violation_cost_cap",
            self.violation_cost_cap,
            "a number in [1, 1e6]",
        );
        v.check(
            self.flops_scale > 0.0 && self.flops_scale <= 1e30,
            "flops_scale",
            self.flops_scale,
            "a number in (0, 1e30]",
        );
    }
}

impl Validate for ObservationConfig {
    fn validate(&self, v: &mut Violations) {
        for (k, x) in [
            ("sensitivity_noise", self.sensitivity_noise),
            ("grad_noise", self.grad_noise),
            ("tail_noise", self.tail_noise),
        ] {
            v.check((0.0..=5.0).contains(&x), k, x, "a number >= 0 and <= 5 (a standard deviation of ln)");
        }
        v.check(
            (0.0..=2.0).contains(&self.grad_exponent),
            "grad_exponent",
            self.grad_exponent,
            "a number >= 0 and <= 2",
        );
        v.check(
            self.tail_scale > 0.0 && self.tail_scale <= 10.0,
            "tail_scale",
            self.tail_scale,
            "a number > 0 and <= 10",
        );
    }
}

impl Validate for BaselineConfig {
    fn validate(&self, v: &mut Violations) {
        v.check((0.0..=1e6).contains(&self.margin), "margin", self.margin, "a number >= 0 and <= 1e6");
        v.check(
            self.adalora_beta > 0.0 && self.adalora_beta <= 10.0,
            "adalora_beta",
            self.adalora_beta,
            "a number in (0, 10]",
        );
    }
}

/// Names of the embedded presets; the first is the default.
pub const NAMES: [&str; 5] = ["wireless-rayleigh", "wireless-rician", "latency", "budget", "llama7b"];

/// The default preset name.
pub const DEFAULT: &str = "wireless-rayleigh";

const EMBEDDED: [(&str, &str); 5] = [
    ("wireless-rayleigh", include_str!("../presets/wireless-rayleigh.toml")),
    ("wireless-rician", include_str!("../presets/wireless-rician.toml")),
    ("latency", include_str!("../presets/latency.toml")),
    ("budget", include_str!("../presets/budget.toml")),
    ("llama7b", include_str!("../presets/llama7b.toml")),
];

/// Embedded calibration files, usable from embedded presets as `calibration = "builtin:<name>"`.
const EMBEDDED_CALIBRATIONS: [(&str, &str); 1] = [("example", include_str!("../presets/calibration-example.json"))];

/// Loads a preset by embedded name (see [`NAMES`]) or by path to a TOML file.
pub fn load(name_or_path: &str) -> Result<EnvPreset, EnvError> {
    if let Some((name, text)) = EMBEDDED.iter().find(|(n, _)| *n == name_or_path) {
        return from_toml(text, &format!("<embedded preset {name}>"), None);
    }
    let path = Path::new(name_or_path);
    if path.exists() {
        return load_path(path);
    }
    Err(EnvError::UnknownPreset {
        name: name_or_path.to_string(),
        allowed: NAMES.join(", ") + ", or a path to a .toml file",
    })
}

/// Loads a preset from a TOML file; a relative `sites.calibration` is resolved against the
/// file's directory.
pub fn load_path(path: &Path) -> Result<EnvPreset, EnvError> {
    let text = std::fs::read_to_string(path)
        .map_err(|cause| EnvError::Preset(rankpilot_config::ConfigError::Io { file: path.to_path_buf(), cause }))?;
    from_toml(&text, &path.display().to_string(), path.parent().map(Path::to_path_buf))
}

/// Parses and validates preset text; `file` names it in errors, `base_dir` resolves a relative
/// calibration path.
pub fn from_toml(text: &str, file: &str, base_dir: Option<PathBuf>) -> Result<EnvPreset, EnvError> {
    let mut p: EnvPreset = rankpilot_config::from_str(text, file).map_err(EnvError::Preset)?;
    if let Some(c) = &p.sites.calibration {
        let cal = if let Some(name) = c.strip_prefix("builtin:") {
            let (_, text) = EMBEDDED_CALIBRATIONS.iter().find(|(n, _)| *n == name).ok_or_else(|| EnvError::Config {
                key: "sites.calibration".into(),
                found: c.clone(),
                allowed: format!(
                    "builtin:{} or a path to a JSON file",
                    EMBEDDED_CALIBRATIONS.map(|(n, _)| n).join(", builtin:")
                ),
            })?;
            Calibration::from_json(text, c)?
        } else {
            let path = match &base_dir {
                Some(d) if Path::new(c).is_relative() => d.join(c),
                _ => PathBuf::from(c),
            };
            Calibration::load(&path)?
        };
        p.calibration_data = Some(cal.with_spectrum_exponent(p.sites.spectrum_exponent));
    }
    // What can only be checked on the built environment (ranks against the sites' shapes, the
    // calibration against the sites) is checked here too, so the error names the file.
    if let Err(e) = crate::EnvSpec::new(&p) {
        let violation = match e {
            EnvError::Config { key, found, allowed } => rankpilot_config::Violation { key, found, allowed },
            other => return Err(other),
        };
        return Err(EnvError::Preset(rankpilot_config::ConfigError::Invalid {
            file: PathBuf::from(file),
            violations: vec![violation],
        }));
    }
    Ok(p)
}

/// The embedded TOML text of a preset (for logging the effective config).
pub fn embedded_text(name: &str) -> Option<&'static str> {
    EMBEDDED.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}
