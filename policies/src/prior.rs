//! The model-based prior of the policy (residual policy learning).
//!
//! **Why.** PPO alone peaks early (gap closed ≈ 0.45) while a hand-written model-based allocator
//! that solves the oracle's hold-the-plan knapsack from observable quantities reaches 0.63–0.80
//! (the `envs` README's probe rows). So the policy starts *from* such an allocator: each site's
//! utility for rank r_j is the prior value below (scaled) plus a residual learned by PPO, whose
//! last layer starts at zero. Before any training the executed plan is exactly the prior's
//! knapsack plan; PPO then only has to learn corrections.
//!
//! **What it uses.** Only the observation row of each site, the round's progress, the cost per
//! rank unit and the (conservative) budget the allocation is solved at — never hidden state —
//! plus beliefs from the policy preset ([`PriorConfig`]): the mean spectral decay per
//! projection kind, the dynamics' learning rate and loss floor, the horizon, the cost
//! coefficient. With `infer` (the default preset) all of these but the cost coefficient are
//! inferred from the episode's history ([`crate::belief`]: the horizon from progress, the
//! decays and sensitivities from every round's measurements, η and L∞ by fitting the observed
//! loss), and the fixed beliefs are only the starting point; the estimates below are then the
//! belief's. The cost coefficient is the run's price of the resource, a setting no observation
//! carries: it comes with the round's context (`RoundContext::cost_coef`), like the budget.
//!
//! **Value.** Per site l, with β̂ the decay estimate, Ê the power-law energy table E(r) of β̂
//! (σ_k ∝ k^(−β̂), k ≤ min(d_in, d_out)), ŵ the sensitivity estimate, q̂ the captured share, H
//! the rounds left, ρ = 1 − η and S_H = Σ_{t=1..H} ρᵗ, the value of rank r_j is the oracle's
//! hold-the-plan value (`envs/src/env.rs`, `oracle_tables`):
//!
//! ```text
//! v_lj = ŵ_l·(H·Ê_j − (Ê_j − q̂₀)⁺·S_H) − H·λ·cost_lj / B,   q̂₀ = q̂·Ê_j/Ê_cur if j < cur else q̂
//! ```
//!
//! and the utility handed to the network is `v_lj · L / (H · Σw)`: per round and per average
//! site, so that its size does not depend on the number of sites or on the rounds left (the
//! allocation, an argmax over plans, is unchanged by this positive per-state factor).
//!
//! - **β̂** (spectral decay): the preset-mean decay of the site's projection kind and depth
//!   (`beta`, `beta_depth_slope`) is the prior belief, N(β_role, `beta_sd`²). At rank r ≥ 2 the
//!   observed `tail_share` t = σ_r²/Σ_{k≤r}σ_k² (log-normal noise `tail_noise`) is inverted on a
//!   β grid; the measurement's standard deviation is `tail_noise / |d ln t/dβ|`, and the two are
//!   combined by precision weighting. At rank r ≥ 16 the measurement dominates.
//! - **q̂** (captured share): the site is assumed to have held its current rank since the start
//!   of the episode: q̂ = Ê_cur·(1 − ρ^round).
//! - **ŵ** (sensitivity): the geometric mean of the observed `sensitivity` and of
//!   `grad_norm / √(1 − q̂)` (both estimate w_l·L/Σw with independent noise), times Σw / L.
//!
//! **Skipping** (a network with a skip head). The prior also values skipping the round as the
//! skip-aware oracle does (`envs`' `oracle_skip_value`): no progress and no cost now, then the
//! current plan held for H − 1 rounds,
//!
//! ```text
//! v_l^skip = ŵ_l·(q̂ + (H−1)·Ê_cur − (Ê_cur − q̂)⁺·S_{H−1}) − (H−1)·λ·cost_l,cur / B
//! ```
//!
//! and its *skip margin* is Σ_l v_l^skip minus the value of the best plan that fits the budget
//! (the knapsack over v_lj), in the same normalized units. The skip logit is
//! `s·margin + residual`, so an untrained network skips exactly when the prior's values say so.
//!
//! **Risk** (`risk`, with `infer`). The environment's conservative budget backs a fixed safety
//! margin off the estimate; where the estimate is noisier than the margin assumes, filling it
//! loses rounds (a lost round pays (violation_coef + λ)·c, ten times a round's loss), and where
//! it is more precise, the margin wastes budget. With `risk` the belief measures the estimate's
//! error x = ln(B_true / B_est) from each sent round's `last_cost_ratio`, and the prior plans at
//! the budget b = B_est·e^τ that maximizes (1 − p)·V(b) + p·(Σv^skip − penalty), p = P(x < τ)
//! (V the knapsack's LP relaxation over v_lj). The skip margin then counts the same risk:
//! (1 − p)·(Σv^skip − V(b)) + p·penalty. A fixed parameter budget is known exactly and keeps
//! the given budget.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use envs::sites::power_law_tables;
use envs::{GLOBAL_FEATURES, GlobalFeature, Observation, RankPolicy, RoundContext, SITE_FEATURES, SiteFeature};

use crate::belief::{Belief, Dynamics};
use crate::model::{BudgetContext, ObsBatch};

/// Mean spectral decay β per projection kind, as the observation groups them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleBeta {
    /// q and k projections (`role_qk`).
    pub qk: f64,
    /// v and o projections (`role_vo`).
    pub vo: f64,
    /// gate and up projections (`role_mlp_in`).
    pub mlp_in: f64,
    /// down projections (`role_mlp_out`).
    pub mlp_out: f64,
}

/// Settings of the model-based prior (`[prior]` in a policy preset). The defaults are the
/// beliefs matching the embedded environment presets: the role means of their `[spectrum]`
/// (q 1.3 / k 1.4 → 1.35, v 0.5 / o 0.6 → 0.55, gate 0.8 / up 0.75 → 0.775, down 0.45), their
/// dynamics (η 0.3, 20 rounds), λ = 0.1 and the observation noise of `tail_share` (0.2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PriorConfig {
    /// Add the prior to the policy's utilities (default false, so that checkpoints written
    /// before the prior existed load and act as they did; `default.toml` turns it on).
    pub enabled: bool,
    /// Initial multiplier of the prior utility in the logits (default 4). It is a trained
    /// parameter (`net.prior_log_scale`) when `learn_scale` is true.
    pub scale: f64,
    /// Train the multiplier with PPO (default true).
    pub learn_scale: bool,
    /// The multiplier scales the network's residual too, `s·(prior + residual)`, making it the
    /// policy's temperature (default false: `s·prior + residual`, as checkpoints written before
    /// this setting act).
    #[serde(default)]
    pub scale_residual: bool,
    /// Rounds of an episode / fine-tuning run, for the rounds left H (default 20).
    pub rounds: f64,
    /// Per-round learning rate η of the captured share (default 0.3).
    pub eta: f64,
    /// Cost coefficient λ of the reward (default 0.1).
    pub cost_coef: f64,
    /// Σ_l w_l: the loss the adapters can remove, in reward units (default 1).
    pub sensitivity_total: f64,
    /// Mean β per projection kind.
    pub beta: RoleBeta,
    /// β change from the first to the last layer (default −0.3: deeper layers are flatter).
    pub beta_depth_slope: f64,
    /// Standard deviation of a site's β around its kind's mean (default 0.16).
    pub beta_sd: f64,
    /// Clip of β̂ (default 0.2).
    pub beta_min: f64,
    /// Clip of β̂ (default 2.5).
    pub beta_max: f64,
    /// Standard deviation of ln(`tail_share`) noise (default 0.2).
    pub tail_noise: f64,
    /// min(d_in, d_out) assumed when the caller does not give the sites' shapes (default 4096).
    pub default_dim: u32,
    /// The loss floor L∞ of the dynamics. When set, the captured share also uses the observed
    /// `loss_ratio`: Σ_l w_l·q_l = (L∞ + Σw)·(1 − loss_ratio), which sees rounds that made no
    /// progress (skipped or lost); q̂ is then E_cur·min(1 − ρ^round, κ) with κ the common
    /// fraction that matches it (with the ŵ rescaled to sum to Σw). Default none: q̂ = E_cur·(1 − ρ^round), as checkpoints written
    /// before this setting existed act.
    #[serde(default)]
    pub loss_floor: Option<f64>,
    /// Infer the horizon, η, L∞, the decays and the sensitivities from the episode's history
    /// ([`crate::belief`]), and value plans at the run's cost coefficient when the caller gives
    /// it ([`BudgetContext::cost_coef`]); the beliefs above are then only the starting point.
    /// Default false, so that checkpoints written before inference existed act as they did.
    #[serde(default)]
    pub infer: bool,
    /// With `infer`: standard deviation of ln η around `eta` (default 0.7).
    #[serde(default = "default_eta_sd")]
    pub eta_sd: f64,
    /// With `infer`: standard deviation of 1/(L∞ + Σw) around its belief (default 0.15).
    #[serde(default = "default_loss_scale_sd")]
    pub loss_scale_sd: f64,
    /// With `infer`: spread of a kind's mean decay around `beta` across environments
    /// (default 0.25).
    #[serde(default = "default_beta_role_sd")]
    pub beta_role_sd: f64,
    /// With `infer`, on a resource whose budget is estimated (channel, compute): plan at the
    /// budget that maximizes the round's expected value under the inferred error of the
    /// conservative budget ([`crate::belief::BudgetError`]), instead of at the conservative
    /// budget itself, and value the skip decision with the violation's risk (see the module
    /// doc). Default false, so that checkpoints written before it act as they did.
    #[serde(default)]
    pub risk: bool,
    /// With `risk`: the prior belief of the spread of ln(B_true / B_conservative) (default 0.1).
    #[serde(default = "default_budget_error_sd")]
    pub budget_error_sd: f64,
    /// With `risk`: the reward's violation multiplier (AirLLM's 10, every built-in preset's):
    /// a lost round costs (violation_coef + λ)·c instead of the loss.
    #[serde(default = "default_violation_coef")]
    pub violation_coef: f64,
}

fn default_budget_error_sd() -> f64 {
    0.1
}

fn default_violation_coef() -> f64 {
    10.0
}

fn default_eta_sd() -> f64 {
    0.7
}

fn default_loss_scale_sd() -> f64 {
    0.15
}

fn default_beta_role_sd() -> f64 {
    0.25
}

/// What the values of one round are computed from: the rounds left, η, u = 1/(L∞ + Σw), and
/// per site its E(r) table (`n × |ranks|`), current rank index, sensitivity and captured share.
struct RoundModel {
    h: f64,
    eta: f64,
    u: f64,
    e: Vec<f64>,
    cur: Vec<usize>,
    w: Vec<f64>,
    q: Vec<f64>,
}

/// Names of the global estimates a network reads with `net.estimates` ([`Prior::evaluate`]),
/// in the order they follow the normalized global features.
pub const ESTIMATE_GLOBAL_NAMES: [&str; 4] =
    ["est_ln_rounds_left", "est_convergence_left", "est_ln_eta", "est_removable_loss"];

/// Names of the per-site estimates before the energy row; the row follows as one
/// `est_energy_r<rank>` per rank of the set ([`estimate_site_names`]).
/// (`network::RankInputs` reads the price, the captured share and the energy row by position:
/// keep it in step with this order.)
pub const ESTIMATE_SITE_NAMES: [&str; 3] = ["est_ln_sensitivity", "est_price_max_rank", "est_captured"];

/// Every per-site estimate name for a rank set, in row order.
pub fn estimate_site_names(ranks: &[u32]) -> Vec<String> {
    ESTIMATE_SITE_NAMES.iter().map(|s| s.to_string()).chain(ranks.iter().map(|r| format!("est_energy_r{r}"))).collect()
}

/// What [`Prior::evaluate`] is asked for.
#[derive(Debug, Clone, Copy)]
pub struct Want {
    /// The prior's values v_lj.
    pub values: bool,
    /// The skip margin per environment (needs `values`).
    pub skip: bool,
    /// The estimates a network reads (`net.estimates`).
    pub estimates: bool,
    /// Without `values`: the budget to plan at, the one whose inferred probability of a lost
    /// round is this (`net.loss_quantile`; 0: the given budget, and no `plan_budget`).
    pub loss_quantile: f64,
}

/// [`Prior::evaluate`]'s output for a batch; a part not asked for is empty.
#[derive(Debug, Clone, Default)]
pub struct PriorOutput {
    /// Values `n_envs × n_sites × |ranks|`.
    pub values: Vec<f32>,
    /// Skip margins, one per environment.
    pub skip_margin: Vec<f32>,
    /// The budget each environment's plan is to fit, one per environment (with `values`): the
    /// given budget, or with `risk` the one chosen for the inferred violation risk.
    pub plan_budget: Vec<f64>,
    /// Global estimates `n_envs × ESTIMATE_GLOBAL_NAMES.len()`.
    pub est_global: Vec<f32>,
    /// Site estimates `n_envs × n_sites × (ESTIMATE_SITE_NAMES.len() + |ranks|)`.
    pub est_sites: Vec<f32>,
}

impl Default for PriorConfig {
    fn default() -> Self {
        PriorConfig {
            enabled: false,
            scale: 4.0,
            learn_scale: true,
            scale_residual: false,
            rounds: 20.0,
            eta: 0.3,
            cost_coef: 0.1,
            sensitivity_total: 1.0,
            beta: RoleBeta { qk: 1.35, vo: 0.55, mlp_in: 0.775, mlp_out: 0.45 },
            beta_depth_slope: -0.3,
            beta_sd: 0.16,
            beta_min: 0.2,
            beta_max: 2.5,
            tail_noise: 0.2,
            default_dim: 4096,
            loss_floor: None,
            infer: false,
            eta_sd: default_eta_sd(),
            loss_scale_sd: default_loss_scale_sd(),
            beta_role_sd: default_beta_role_sd(),
            risk: false,
            budget_error_sd: default_budget_error_sd(),
            violation_coef: default_violation_coef(),
        }
    }
}

impl rankpilot_config::Validate for PriorConfig {
    fn validate(&self, v: &mut rankpilot_config::Violations) {
        v.check(self.scale > 0.0 && self.scale.is_finite(), "scale", self.scale, "a number > 0");
        v.check(self.rounds >= 1.0, "rounds", self.rounds, "a number >= 1");
        v.check(self.eta > 0.0 && self.eta < 1.0, "eta", self.eta, "a number in (0, 1)");
        v.check(self.cost_coef >= 0.0, "cost_coef", self.cost_coef, "a number >= 0");
        v.check(self.sensitivity_total > 0.0, "sensitivity_total", self.sensitivity_total, "a number > 0");
        v.check(self.beta_sd > 0.0, "beta_sd", self.beta_sd, "a number > 0");
        v.check(self.beta_min > 0.0, "beta_min", self.beta_min, "a number > 0");
        v.check(self.beta_max > self.beta_min, "beta_max", self.beta_max, "a number > beta_min");
        v.check(self.tail_noise > 0.0, "tail_noise", self.tail_noise, "a number > 0");
        v.check(self.default_dim >= 1, "default_dim", self.default_dim, "an integer >= 1");
        for (k, x) in
            [("eta_sd", self.eta_sd), ("loss_scale_sd", self.loss_scale_sd), ("beta_role_sd", self.beta_role_sd)]
        {
            v.check(x > 0.0 && x <= 10.0, k, x, "a number in (0, 10]");
        }
        if let Some(f) = self.loss_floor {
            v.check(f >= 0.0 && f.is_finite(), "loss_floor", f, "a number >= 0");
        }
        v.check(
            self.budget_error_sd > 0.0 && self.budget_error_sd <= 10.0,
            "budget_error_sd",
            self.budget_error_sd,
            "a number in (0, 10]",
        );
        v.check(
            self.violation_coef >= 0.0 && self.violation_coef.is_finite(),
            "violation_coef",
            self.violation_coef,
            "a number >= 0",
        );
        v.check(!self.risk || self.infer, "risk", self.risk, "false unless `infer` is true (the risk is inferred)");
        for (k, b) in [
            ("beta.qk", self.beta.qk),
            ("beta.vo", self.beta.vo),
            ("beta.mlp_in", self.beta.mlp_in),
            ("beta.mlp_out", self.beta.mlp_out),
        ] {
            v.check(b > 0.0, k, b, "a number > 0");
        }
    }
}

/// Step of the β grid the energy and tail-share tables are tabulated on.
const GRID_STEP: f64 = 0.01;

/// E(r) and ln tail_share(r) of a power law at every rank of the set, on a β grid, for one
/// site dimension.
#[derive(Debug)]
struct Tables {
    dim: u32,
    /// `[grid point][rank index]`.
    energy: Vec<f32>,
    ln_tail: Vec<f32>,
}

/// The prior: settings, rank set, and tables (built lazily per site dimension).
#[derive(Debug)]
pub struct Prior {
    /// Settings.
    pub cfg: PriorConfig,
    ranks: Vec<u32>,
    grid: Vec<f64>,
    tables: Mutex<Vec<Arc<Tables>>>,
}

impl Clone for Prior {
    fn clone(&self) -> Self {
        Prior::new(self.cfg.clone(), &self.ranks)
    }
}

impl Prior {
    /// A prior over `ranks` (ascending, as the rank set).
    pub fn new(cfg: PriorConfig, ranks: &[u32]) -> Self {
        let n = ((cfg.beta_max - cfg.beta_min) / GRID_STEP).ceil() as usize + 1;
        let grid = (0..n).map(|i| (cfg.beta_min + i as f64 * GRID_STEP).min(cfg.beta_max)).collect();
        Prior { cfg, ranks: ranks.to_vec(), grid, tables: Mutex::new(Vec::new()) }
    }

    /// The rank set the prior values.
    pub fn ranks(&self) -> &[u32] {
        &self.ranks
    }

    fn tables(&self, dim: u32) -> Arc<Tables> {
        let mut cache = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = cache.iter().find(|t| t.dim == dim) {
            return t.clone();
        }
        let k = self.ranks.len();
        let mut energy = Vec::with_capacity(self.grid.len() * k);
        let mut ln_tail = Vec::with_capacity(self.grid.len() * k);
        let (mut e, mut t) = (vec![0f32; k], vec![0f32; k]);
        for &b in &self.grid {
            power_law_tables(1.0, b, dim, &self.ranks, &mut e, &mut t);
            energy.extend_from_slice(&e);
            ln_tail.extend(t.iter().map(|&x| x.max(1e-30).ln()));
        }
        let t = Arc::new(Tables { dim, energy, ln_tail });
        cache.push(t.clone());
        t
    }

    /// The β whose ln tail share at rank index `j` is `x` (clipped to the grid), and
    /// |d ln t/dβ| there.
    fn invert_tail(&self, tab: &Tables, j: usize, x: f64) -> (f64, f64) {
        // ln t is decreasing in β: find the grid interval that brackets the observation.
        let k = self.ranks.len();
        let x = x as f32;
        let n = self.grid.len();
        let lt = |i: usize| tab.ln_tail[i * k + j];
        if x >= lt(0) {
            (self.grid[0], (lt(0) - lt(1)) as f64 / GRID_STEP)
        } else if x <= lt(n - 1) {
            (self.grid[n - 1], (lt(n - 2) - lt(n - 1)) as f64 / GRID_STEP)
        } else {
            let (mut lo, mut hi) = (0usize, n - 1);
            while hi - lo > 1 {
                let mid = (lo + hi) / 2;
                if lt(mid) >= x { lo = mid } else { hi = mid }
            }
            let d = (lt(lo) - lt(hi)) as f64;
            let f = if d > 0.0 { (lt(lo) - x) as f64 / d } else { 0.0 };
            (self.grid[lo] + f * (self.grid[hi] - self.grid[lo]), d / GRID_STEP)
        }
    }

    /// β̂ of one site: the kind's mean, updated with the observed tail share at rank index `j`.
    fn beta_estimate(&self, tab: &Tables, row: &[f32], j: usize) -> f64 {
        let c = &self.cfg;
        let role = [c.beta.qk, c.beta.vo, c.beta.mlp_in, c.beta.mlp_out];
        let onehot = &row[SiteFeature::ROLE_GROUPS];
        let s: f64 = onehot.iter().map(|&x| x as f64).sum();
        let mean = if s > 0.0 {
            onehot.iter().zip(role).map(|(&x, b)| x as f64 * b).sum::<f64>() / s
        } else {
            role.iter().sum::<f64>() / 4.0
        };
        let prior = mean + c.beta_depth_slope * (row[SiteFeature::Depth] as f64 - 0.5);
        let tail = row[SiteFeature::TailShare] as f64;
        if self.ranks[j] < 2 || tail <= 0.0 || !tail.is_finite() {
            return prior.clamp(c.beta_min, c.beta_max);
        }
        let (meas, slope) = self.invert_tail(tab, j, tail.ln());
        let sd_meas = c.tail_noise / slope.max(1e-6);
        let (wp, wm) = (1.0 / (c.beta_sd * c.beta_sd), 1.0 / (sd_meas * sd_meas));
        ((prior * wp + meas * wm) / (wp + wm)).clamp(c.beta_min, c.beta_max)
    }

    /// Prior values v_lj (reward units, see the module doc) of one environment (`obs` and
    /// `budget` of one environment), written to `out` (`n_sites × |ranks|`), normalized per
    /// round and per average site. `budget.dims` gives each site's min(d_in, d_out)
    /// (`default_dim` when `None`). With `infer` on, `belief` is the environment's episode
    /// history: this observation is added to it and the constants are inferred from it
    /// ([`crate::belief`]); otherwise (or without one) the fixed beliefs are used. Returns
    /// Σ_l v_l^skip, the value of skipping the round, in the same units.
    pub fn values_into(
        &self,
        obs: ObsBatch<'_>,
        budget: BudgetContext<'_>,
        belief: Option<&mut Belief>,
        out: &mut [f32],
    ) -> f64 {
        debug_assert_eq!((obs.n_envs, budget.budgets.len()), (1, 1), "one environment");
        debug_assert_eq!(obs.global.len(), GLOBAL_FEATURES);
        debug_assert_eq!(out.len(), obs.sites.len() / SITE_FEATURES * self.ranks.len());
        let m = self.round_model(obs, budget.dims, belief);
        self.values_of(&m, budget, out)
    }

    /// This round's model of one environment: inferred from `belief` (after adding this
    /// observation to it) when the prior infers and a belief is given, else the fixed beliefs.
    fn round_model(&self, obs: ObsBatch<'_>, dims: Option<&[u32]>, belief: Option<&mut Belief>) -> RoundModel {
        match belief.filter(|_| self.cfg.infer) {
            Some(b) => self.model_inferred(obs, dims, b),
            None => self.model_fixed(obs, dims),
        }
    }

    /// The values of one round's model into `out` (`n_sites × |ranks|`); returns the skip value.
    fn values_of(&self, m: &RoundModel, budget: BudgetContext<'_>, out: &mut [f32]) -> f64 {
        let c = &self.cfg;
        let k = self.ranks.len();
        let n = m.cur.len();
        let RoundModel { h, eta, ref e, ref cur, ref w, ref q, .. } = *m;
        let b = budget.budgets[0].max(f64::MIN_POSITIVE);
        let unit_cost = budget.unit_cost;
        // The run's price of the resource, when the prior adapts to the run.
        let lambda = if c.infer { budget.cost_coef.unwrap_or(c.cost_coef) } else { c.cost_coef };
        let rho = 1.0 - eta;
        let s_h = rho * (1.0 - rho.powf(h)) / eta;
        let s_h1 = rho * (1.0 - rho.powf(h - 1.0)) / eta;
        let norm = n as f64 / (h * c.sensitivity_total);
        let mut skip_value = 0.0;
        for l in 0..n {
            let el = &e[l * k..(l + 1) * k];
            let ec = el[cur[l]];
            let q = q[l];
            for j in 0..k {
                let q0 = if j < cur[l] && ec > 0.0 { q * el[j] / ec } else { q };
                let cost = self.ranks[j] as f64 * unit_cost[l];
                let v = w[l] * (h * el[j] - (el[j] - q0).max(0.0) * s_h) - h * lambda * cost / b;
                out[l * k + j] = (v * norm) as f32;
            }
            let cost = self.ranks[cur[l]] as f64 * unit_cost[l];
            skip_value +=
                norm * (w[l] * (q + (h - 1.0) * ec - (ec - q).max(0.0) * s_h1) - (h - 1.0) * lambda * cost / b);
        }
        skip_value
    }

    /// The estimates of one round's model a network reads (`net.estimates`), hand-scaled to
    /// order one: globally ln H / 3, 1 − ρ^H (the convergence still to come), ln η + 1.5 and
    /// u·Σw (the share of the loss the adapters can remove); per site ln(ŵ_l·L/Σw), the price of
    /// its largest rank in the prior's value units (L·λ·cost_l,max / (B·Σw), capped at 10), q̂_l
    /// and Ê_l(r) at every rank of the set. Beliefs and fits only: no value, no plan.
    fn estimates_of(&self, m: &RoundModel, budget: BudgetContext<'_>, global: &mut [f32], sites: &mut [f32]) {
        let c = &self.cfg;
        let k = self.ranks.len();
        let n = m.cur.len();
        let w_sum: f64 = m.w.iter().sum::<f64>().max(f64::MIN_POSITIVE);
        let lambda = budget.cost_coef.unwrap_or(c.cost_coef);
        let b = budget.budgets[0].max(f64::MIN_POSITIVE);
        let r_max = *self.ranks.last().unwrap_or(&1) as f64;
        let rho = 1.0 - m.eta;
        global.copy_from_slice(&[
            (m.h.ln() / 3.0) as f32,
            (1.0 - rho.powf(m.h)) as f32,
            (m.eta.ln() + 1.5) as f32,
            (m.u * c.sensitivity_total) as f32,
        ]);
        let row_len = ESTIMATE_SITE_NAMES.len() + k;
        for (l, row) in sites.chunks_exact_mut(row_len).enumerate() {
            row[0] = (m.w[l] * n as f64 / w_sum).max(1e-6).ln() as f32;
            row[1] = (n as f64 * lambda * r_max * budget.unit_cost[l] / (b * c.sensitivity_total)).min(10.0) as f32;
            row[2] = m.q[l] as f32;
            for j in 0..k {
                row[3 + j] = m.e[l * k + j] as f32;
            }
        }
    }

    /// The budget B_est·exp(μ̂ + ŝ·z) at which a plan that fills it is lost with the inferred
    /// probability p = Φ(z) (`net.loss_quantile`), for an estimated budget with a history;
    /// `None` where the budget is fixed and known.
    fn loss_quantile_budget(&self, global: &[f32], unit_cost: &[f64], z: f64, belief: Option<&Belief>) -> Option<f64> {
        let estimated = global[GlobalFeature::ResourceBudget] == 0.0;
        let reference = estimated_budget(global, unit_cost, &self.ranks)?;
        let err = belief.filter(|_| estimated)?.budget_error(self.cfg.budget_error_sd);
        Some(reference * (err.mean + err.sd * z).exp())
    }

    /// Each site's current rank index, from the `rank` feature.
    fn current_indices(&self, sites: &[f32]) -> Vec<usize> {
        let rmax = *self.ranks.last().unwrap_or(&1) as f64;
        sites
            .chunks_exact(SITE_FEATURES)
            .map(|row| {
                let r = row[SiteFeature::Rank] as f64 * rmax;
                self.ranks
                    .iter()
                    .enumerate()
                    .min_by(|a, b| ((*a.1 as f64 - r).abs()).total_cmp(&(*b.1 as f64 - r).abs()))
                    .map_or(0, |x| x.0)
            })
            .collect()
    }

    /// The E table of site `l` (its dimension from `dims`, else `default_dim`).
    fn site_tables(&self, dims: Option<&[u32]>, l: usize) -> Arc<Tables> {
        self.tables(dims.map_or(self.cfg.default_dim, |d| d[l]))
    }

    /// E(r_j) for every rank of the set at decay `beta`, interpolated linearly on the grid.
    fn energy_row(&self, tab: &Tables, beta: f64, out: &mut [f64]) {
        let c = &self.cfg;
        let k = self.ranks.len();
        let pos = ((beta - c.beta_min) / GRID_STEP).clamp(0.0, (self.grid.len() - 1) as f64);
        let i0 = (pos.floor() as usize).min(self.grid.len().saturating_sub(2));
        let f = pos - i0 as f64;
        for j in 0..k {
            let a = tab.energy[i0 * k + j] as f64;
            let z = tab.energy[(i0 + 1).min(self.grid.len() - 1) * k + j] as f64;
            out[j] = a + f * (z - a);
        }
    }

    /// The round's model with the fixed beliefs of the config.
    fn model_fixed(&self, obs: ObsBatch<'_>, dims: Option<&[u32]>) -> RoundModel {
        let ObsBatch { global, sites, .. } = obs;
        let c = &self.cfg;
        let k = self.ranks.len();
        let n = sites.len() / SITE_FEATURES;
        let round = (global[GlobalFeature::Progress] as f64 * c.rounds).round().max(0.0);
        let h = (c.rounds - round).max(1.0);
        let rho = 1.0 - c.eta;
        let conv = 1.0 - rho.powf(round);
        let cur = self.current_indices(sites);
        // Per site the energy table at β̂ and the sensitivity.
        let mut e = vec![0f64; n * k];
        let mut w = vec![0f64; n];
        for l in 0..n {
            let row = &sites[l * SITE_FEATURES..(l + 1) * SITE_FEATURES];
            let tab = self.site_tables(dims, l);
            let beta = self.beta_estimate(&tab, row, cur[l]);
            self.energy_row(&tab, beta, &mut e[l * k..(l + 1) * k]);
            let q = e[l * k + cur[l]] * conv;
            // Sensitivity: geometric mean of the two noisy measurements of w·L/Σw.
            let sens = (row[SiteFeature::Sensitivity] as f64).max(1e-6);
            let g = row[SiteFeature::GradNorm] as f64;
            let w_obs = if g > 0.0 && q < 0.99 { (sens * g / (1.0 - q).sqrt()).sqrt() } else { sens };
            w[l] = w_obs * c.sensitivity_total / n as f64;
        }
        // The captured fraction of the current energy: 1 − ρ^round, or less when the loss says
        // some rounds made no progress.
        let frac = match c.loss_floor {
            Some(floor) => {
                let captured = (floor + c.sensitivity_total) * (1.0 - global[GlobalFeature::LossRatio] as f64);
                // The noisy ŵ are biased upward (log-normal noise): rescale them to Σw here.
                let w_sum: f64 = w.iter().sum::<f64>().max(f64::MIN_POSITIVE);
                let full: f64 = (0..n).map(|l| w[l] * e[l * k + cur[l]]).sum::<f64>() * c.sensitivity_total / w_sum;
                if full > 0.0 { conv.min((captured / full).max(0.0)) } else { conv }
            }
            None => conv,
        };
        let q = (0..n).map(|l| e[l * k + cur[l]] * frac).collect();
        let u = 1.0 / (c.loss_floor.unwrap_or(0.5) + c.sensitivity_total);
        RoundModel { h, eta: c.eta, u, e, cur, w, q }
    }

    /// The round's model inferred from the episode's history ([`crate::belief`]), after adding
    /// this observation to `belief`.
    fn model_inferred(&self, obs: ObsBatch<'_>, dims: Option<&[u32]>, belief: &mut Belief) -> RoundModel {
        let ObsBatch { global, sites, .. } = obs;
        let c = &self.cfg;
        let k = self.ranks.len();
        let n = sites.len() / SITE_FEATURES;
        let cur = self.current_indices(sites);
        belief.observe(global, sites, &cur, k);
        let belief = &*belief;
        let rounds = belief.rounds(c.rounds);
        let round = (global[GlobalFeature::Progress] as f64 * rounds).round().max(0.0);
        let h = (rounds - round).max(1.0);
        // Decay: per site the precision-weighted inversion of its mean ln tail share at every
        // rank it has been measured at, then the kind means pooled over the sites.
        let noise = belief.tail_noise(c.tail_noise);
        let role = [c.beta.qk, c.beta.vo, c.beta.mlp_in, c.beta.mlp_out];
        let tabs: Vec<Arc<Tables>> = (0..n).map(|l| self.site_tables(dims, l)).collect();
        let mut meas: Vec<Option<(f64, f64)>> = vec![None; n];
        let mut kind: Vec<Option<usize>> = vec![None; n];
        let mut depth_shift = vec![0f64; n];
        for l in 0..n {
            let row = &sites[l * SITE_FEATURES..(l + 1) * SITE_FEATURES];
            kind[l] = row[SiteFeature::ROLE_GROUPS].iter().position(|&x| x > 0.5);
            depth_shift[l] = c.beta_depth_slope * (row[SiteFeature::Depth] as f64 - 0.5);
            let (mut wsum, mut bsum) = (0.0, 0.0);
            for j in (0..k).filter(|&j| self.ranks[j] >= 2) {
                let (x, m) = belief.mean_ln_tail(l, j);
                if m == 0 {
                    continue;
                }
                let (beta, slope) = self.invert_tail(&tabs[l], j, x);
                let var = noise * noise / (m as f64 * slope.max(1e-6).powi(2));
                wsum += 1.0 / var;
                bsum += beta / var;
            }
            if wsum > 0.0 {
                meas[l] = Some((bsum / wsum, 1.0 / wsum));
            }
        }
        let (sd, tau) = (c.beta_sd * c.beta_sd, c.beta_role_sd * c.beta_role_sd);
        let pooled: Vec<(f64, f64)> = (0..4)
            .map(|r| {
                let (mut p, mut s) = (1.0 / tau, role[r] / tau);
                for l in (0..n).filter(|&l| kind[l] == Some(r)) {
                    if let Some((b, v)) = meas[l] {
                        p += 1.0 / (v + sd);
                        s += (b - depth_shift[l]) / (v + sd);
                    }
                }
                (s / p, 1.0 / p)
            })
            .collect();
        let mut e = vec![0f64; n * k];
        for l in 0..n {
            let (mean, var) = match kind[l] {
                Some(r) => (pooled[r].0 + depth_shift[l], pooled[r].1 + sd),
                None => (role.iter().sum::<f64>() / 4.0 + depth_shift[l], tau + sd),
            };
            let beta = match meas[l] {
                Some((b, v)) => (mean / var + b / v) / (1.0 / var + 1.0 / v),
                None => mean,
            };
            self.energy_row(&tabs[l], beta.clamp(c.beta_min, c.beta_max), &mut e[l * k..(l + 1) * k]);
        }
        // Sensitivity from the episode's mean ln sensitivity; the dynamics fit on it (rescaled
        // to Σw: the log-normal ŵ are biased upward), then the current gradient as one more
        // measurement at the fitted captured share.
        let scale = c.sensitivity_total / n as f64;
        let mut w: Vec<f64> = (0..n).map(|l| belief.mean_ln_sensitivity(l).0.exp() * scale).collect();
        let w_sum: f64 = w.iter().sum::<f64>().max(f64::MIN_POSITIVE);
        let w_fit: Vec<f64> = w.iter().map(|x| x * c.sensitivity_total / w_sum).collect();
        let floor = c.loss_floor.unwrap_or(0.5);
        let start = Dynamics { eta: c.eta, u: 1.0 / (floor + c.sensitivity_total) };
        let mut q = vec![0f64; n];
        let fit = belief.fit_dynamics(&e, &w_fit, start, c.eta_sd, c.loss_scale_sd, &mut q);
        for l in 0..n {
            let row = &sites[l * SITE_FEATURES..(l + 1) * SITE_FEATURES];
            let g = row[SiteFeature::GradNorm] as f64;
            if g > 0.0 && q[l] < 0.99 {
                let (ln_s, m) = belief.mean_ln_sensitivity(l);
                let ln_g = (g / (1.0 - q[l]).sqrt()).ln();
                w[l] = ((ln_s * m as f64 + ln_g) / (m as f64 + 1.0)).exp() * scale;
            }
            q[l] = q[l].min(e[l * k + cur[l]]);
        }
        RoundModel { h, eta: fit.eta, u: fit.u, e, cur, w, q }
    }

    /// The skip margin of one environment from its values `v` (`n_sites × |ranks|`) and skip
    /// value: Σ_l v_l^skip − the best plan's value at `budget` (exact knapsack). Positive means
    /// the prior would skip.
    pub fn skip_margin(&self, v: &[f32], skip_value: f64, unit_cost: &[f64], budget: f64) -> f32 {
        let k = self.ranks.len();
        let n = v.len() / k.max(1);
        let values: Vec<f64> = v.iter().map(|&x| x as f64).collect();
        let costs: Vec<f64> = (0..n * k).map(|i| self.ranks[i % k] as f64 * unit_cost[i / k]).collect();
        let mut out = vec![0usize; n];
        let best = envs::oracle::MckpSolver::new()
            .solve(&values, &costs, k, budget, &mut out)
            .map_or_else(|| (0..n).map(|l| values[l * k]).sum(), |(v, _)| v);
        (skip_value - best) as f32
    }

    /// With `risk`: the budget to plan at, the violation probability there and the penalty of a
    /// lost round, in the values' units. A plan that fills budget b = B·e^τ (B the estimated
    /// budget, no margin) is lost when x = ln(B_true / B) < τ, with x ~ N(μ̂, ŝ²) from the belief
    /// ([`Belief::budget_error`]); a lost round pays (violation_coef + λ)·c instead of the
    /// loss and makes no progress, like a skip. Over τ = μ̂ + ŝ·z (z from −4 to 2 in steps of
    /// ¼) the expected value (1 − Φ(z))·V(b) + Φ(z)·(Σv^skip − penalty) is maximized, with V
    /// the LP relaxation of the knapsack over the values `v` (each site's concave hull).
    #[allow(clippy::too_many_arguments)]
    fn risk_choice(
        &self,
        m: &RoundModel,
        v: &[f32],
        skip_value: f64,
        unit_cost: &[f64],
        budget: f64,
        belief: &Belief,
        global: &[f32],
        lambda: f64,
    ) -> (f64, f64, f64) {
        let c = &self.cfg;
        let n = m.cur.len();
        let err = belief.budget_error(c.budget_error_sd);
        // The loss now, which a lost round does not pay (its reward is the penalty alone).
        let loss_now = global[GlobalFeature::LossRatio] as f64 / m.u;
        let norm = n as f64 / (m.h * c.sensitivity_total);
        let penalty = ((c.violation_coef + lambda) - loss_now).max(0.0) * norm;
        let curve = LpCurve::new(&self.ranks, v, unit_cost);
        let mut best = (f64::NEG_INFINITY, budget, 0.0);
        for i in 0..=24 {
            let z = -4.0 + 0.25 * i as f64;
            let b = budget * (err.mean + err.sd * z).exp();
            let p = 0.5 * libm::erfc(-z / std::f64::consts::SQRT_2);
            let value = (1.0 - p) * curve.value(b) + p * (skip_value - penalty);
            if value > best.0 {
                best = (value, b, p);
            }
        }
        (best.1, best.2, penalty)
    }

    /// One round's model per environment of a batch, turned into what `want` asks for: the
    /// values (`n_envs × n_sites × |ranks|`), each environment's skip margin
    /// ([`Prior::skip_margin`]), and the estimates a network reads ([`ESTIMATE_GLOBAL_NAMES`],
    /// [`estimate_site_names`]). The model is built once per environment, so its belief sees
    /// this observation once. `beliefs` holds one episode history per environment when the
    /// prior infers (`infer`); an environment without one uses the fixed beliefs.
    pub fn evaluate(
        &self,
        obs: ObsBatch<'_>,
        budget: BudgetContext<'_>,
        beliefs: &mut [Belief],
        want: Want,
    ) -> PriorOutput {
        let ObsBatch { global, sites, n_envs, n_sites } = obs;
        let BudgetContext { unit_cost, budgets, dims, cost_coef } = budget;
        let k = self.ranks.len();
        let (gl, sl) = (ESTIMATE_GLOBAL_NAMES.len(), ESTIMATE_SITE_NAMES.len() + k);
        let mut out = PriorOutput {
            values: vec![0f32; if want.values { n_envs * n_sites * k } else { 0 }],
            skip_margin: Vec::with_capacity(if want.skip { n_envs } else { 0 }),
            plan_budget: Vec::with_capacity(if want.values || want.loss_quantile > 0.0 { n_envs } else { 0 }),
            est_global: vec![0f32; if want.estimates { n_envs * gl } else { 0 }],
            est_sites: vec![0f32; if want.estimates { n_envs * n_sites * sl } else { 0 }],
        };
        // Φ⁻¹ of `net.loss_quantile`, once per batch.
        let loss_z = if want.loss_quantile > 0.0 { normal_quantile(want.loss_quantile) } else { 0.0 };
        for e in 0..n_envs {
            let one = ObsBatch {
                global: &global[e * GLOBAL_FEATURES..(e + 1) * GLOBAL_FEATURES],
                sites: &sites[e * n_sites * SITE_FEATURES..(e + 1) * n_sites * SITE_FEATURES],
                n_envs: 1,
                n_sites,
            };
            let one_budget = BudgetContext { unit_cost, budgets: &budgets[e..e + 1], dims, cost_coef };
            let m = self.round_model(one, dims, beliefs.get_mut(e));
            if want.values {
                let v = &mut out.values[e * n_sites * k..(e + 1) * n_sites * k];
                let skip_value = self.values_of(&m, one_budget, v);
                // A fixed budget is known exactly: no risk to weigh.
                let estimated = one.global[GlobalFeature::ResourceBudget] == 0.0;
                let reference = estimated_budget(one.global, unit_cost, &self.ranks);
                let risk = match (beliefs.get(e), reference) {
                    (Some(b), Some(reference)) if self.cfg.risk && self.cfg.infer && estimated => {
                        let lambda = cost_coef.unwrap_or(self.cfg.cost_coef);
                        Some(self.risk_choice(&m, v, skip_value, unit_cost, reference, b, one.global, lambda))
                    }
                    _ => None,
                };
                let (plan_budget, p_violation, penalty) = risk.unwrap_or((budgets[e], 0.0, 0.0));
                out.plan_budget.push(plan_budget);
                if want.skip {
                    // Skip when holding beats sending, counting the chance that the plan is lost:
                    // Σv^skip − [(1 − p)·V(b*) + p·(Σv^skip − penalty)].
                    let margin = self.skip_margin(v, skip_value, unit_cost, plan_budget) as f64;
                    out.skip_margin.push(((1.0 - p_violation) * margin + p_violation * penalty) as f32);
                }
            }
            if !want.values && want.loss_quantile > 0.0 {
                let quantile = self.loss_quantile_budget(one.global, unit_cost, loss_z, beliefs.get(e));
                out.plan_budget.push(quantile.unwrap_or(budgets[e]));
            }
            if want.estimates {
                self.estimates_of(
                    &m,
                    one_budget,
                    &mut out.est_global[e * gl..(e + 1) * gl],
                    &mut out.est_sites[e * n_sites * sl..(e + 1) * n_sites * sl],
                );
            }
        }
        out
    }

    /// The prior's own plan (rank indices) for one environment: the exact knapsack over its
    /// values at the environment's budget (`belief`: see [`Prior::values_into`]).
    pub fn plan(&self, obs: ObsBatch<'_>, budget: BudgetContext<'_>, belief: Option<&mut Belief>) -> Vec<usize> {
        let k = self.ranks.len();
        let n = obs.n_sites;
        let mut v = vec![0f32; n * k];
        self.values_into(obs, budget, belief, &mut v);
        self.plan_from_values(&v, budget)
    }

    /// The exact knapsack plan (rank indices) over values `v` (`n_sites × |ranks|`, from
    /// [`Prior::values_into`] or [`Prior::evaluate`]) at the environment's budget.
    pub fn plan_from_values(&self, v: &[f32], budget: BudgetContext<'_>) -> Vec<usize> {
        let k = self.ranks.len();
        let n = v.len() / k.max(1);
        let (unit_cost, budget) = (budget.unit_cost, budget.budgets[0]);
        let values: Vec<f64> = v.iter().map(|&x| x as f64).collect();
        let costs: Vec<f64> = (0..n * k).map(|i| self.ranks[i % k] as f64 * unit_cost[i / k]).collect();
        let mut out = vec![0usize; n];
        if envs::oracle::MckpSolver::new().solve(&values, &costs, k, budget, &mut out).is_none() {
            out.iter_mut().for_each(|x| *x = 0);
        }
        out
    }
}

/// The round's estimated budget (no safety margin) as the observation states it:
/// `budget_ratio_est` × the cost of the plan with every site at the largest rank. `None` where
/// the feature is clipped (at 0, or at its cap: a budget that large holds any plan).
pub fn estimated_budget(global: &[f32], unit_cost: &[f64], ranks: &[u32]) -> Option<f64> {
    let ratio = global[GlobalFeature::BudgetRatioEst] as f64;
    let max_plan: f64 = unit_cost.iter().sum::<f64>() * *ranks.last()? as f64;
    (ratio > 0.0 && ratio < envs::BUDGET_RATIO_CAP * 0.999 && max_plan > 0.0).then_some(ratio * max_plan)
}

/// Φ⁻¹(p) of the standard normal, by bisection on Φ (to 1e-10; p in (0, 1)).
pub fn normal_quantile(p: f64) -> f64 {
    let (mut lo, mut hi) = (-40.0f64, 40.0f64);
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if 0.5 * libm::erfc(-mid / std::f64::consts::SQRT_2) < p {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi - lo < 1e-10 {
            break;
        }
    }
    0.5 * (lo + hi)
}

/// The LP relaxation of the multiple-choice knapsack as a function of the budget: each site's
/// upper concave hull of (cost, value), its segments taken by decreasing value per cost.
struct LpCurve {
    /// The cheapest plan's cost and value (every site at its cheapest choice).
    base: (f64, f64),
    /// Hull segments (cost, value) in the order they are bought.
    steps: Vec<(f64, f64)>,
}

impl LpCurve {
    fn new(ranks: &[u32], v: &[f32], unit_cost: &[f64]) -> Self {
        let k = ranks.len();
        let mut base = (0.0, 0.0);
        let mut steps = Vec::new();
        for (l, &u) in unit_cost.iter().enumerate() {
            // Ranks ascend, so costs do: walk the upper hull from the cheapest choice.
            let point = |j: usize| (ranks[j] as f64 * u, v[l * k + j] as f64);
            if u <= 0.0 {
                // Every choice is free: the best one is part of every plan.
                base.1 += (0..k).map(|j| point(j).1).fold(f64::NEG_INFINITY, f64::max);
                continue;
            }
            let mut at = 0;
            base.0 += point(0).0;
            base.1 += point(0).1;
            while at + 1 < k {
                let (c0, v0) = point(at);
                let next = (at + 1..k).filter(|&j| point(j).0 > c0).max_by(|&a, &b| {
                    let (ca, va) = point(a);
                    let (cb, vb) = point(b);
                    ((va - v0) / (ca - c0)).total_cmp(&((vb - v0) / (cb - c0)))
                });
                match next {
                    Some(j) if point(j).1 > v0 => {
                        steps.push((point(j).0 - c0, point(j).1 - v0));
                        at = j;
                    }
                    _ => break,
                }
            }
        }
        steps.sort_by(|a, b| (b.1 / b.0).total_cmp(&(a.1 / a.0)));
        LpCurve { base, steps }
    }

    /// The relaxation's value at `budget` (−∞ when even the cheapest plan does not fit).
    fn value(&self, budget: f64) -> f64 {
        let (mut cost, mut value) = self.base;
        if cost > budget {
            return f64::NEG_INFINITY;
        }
        for &(dc, dv) in &self.steps {
            if cost + dc <= budget {
                cost += dc;
                value += dv;
            } else {
                return value + dv * (budget - cost) / dc;
            }
        }
        value
    }
}

/// The prior alone as an [`envs::RankPolicy`] (no network), at the conservative budget: what
/// a policy with a zero residual does. For measurements and tests.
pub struct PriorPolicy {
    /// The prior.
    pub prior: Prior,
    /// Give the prior the sites' shapes from the context (else `default_dim`).
    pub use_dims: bool,
    /// The episode's history (used when the prior infers).
    pub belief: Belief,
}

impl RankPolicy for PriorPolicy {
    fn name(&self) -> String {
        "prior".into()
    }

    fn begin_episode(&mut self) {
        self.belief = Belief::new();
    }

    fn act(&mut self, obs: &Observation, ctx: &RoundContext<'_>) -> Vec<u32> {
        let dims: Vec<u32> = ctx.sites.iter().map(|s| s.max_rank()).collect();
        let budget = BudgetContext {
            unit_cost: ctx.unit_cost,
            budgets: &[ctx.conservative_budget],
            dims: self.use_dims.then_some(dims.as_slice()),
            cost_coef: Some(ctx.cost_coef),
        };
        let want = Want { values: true, skip: false, estimates: false, loss_quantile: 0.0 };
        let out = self.prior.evaluate(ObsBatch::one(obs), budget, std::slice::from_mut(&mut self.belief), want);
        let plan = self.prior.plan_from_values(&out.values, BudgetContext { budgets: &out.plan_budget, ..budget });
        let ranks: Vec<u32> = plan.into_iter().map(|j| ctx.rank_set.rank(j)).collect();
        if let Some(reference) = estimated_budget(&obs.global, ctx.unit_cost, self.prior.ranks()) {
            self.belief.sent(reference, ctx.plan_cost(&ranks));
        }
        ranks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A site row of kind `role` (0..4) at mid depth and rank `rank`, with `tail` as tail share.
    fn row(role: usize, rank: u32, tail: f32) -> Vec<f32> {
        let mut r = vec![0f32; SITE_FEATURES];
        r[SiteFeature::Rank] = rank as f32 / 64.0;
        r[SiteFeature::Depth] = 0.5;
        r[SiteFeature::ROLE_GROUPS.start + role] = 1.0;
        r[SiteFeature::Sensitivity] = 1.0;
        r[SiteFeature::GradNorm] = 1.0;
        r[SiteFeature::TailShare] = tail;
        r
    }

    #[test]
    fn the_lp_curve_bounds_the_exact_knapsack_and_meets_it_at_the_hulls_corners() {
        let ranks = [0u32, 1, 2, 4, 8];
        // Three sites; site 1's value at rank 2 lies below its hull (a point the relaxation skips).
        let v: Vec<f32> = vec![
            0.0, 1.0, 1.8, 3.0, 3.5, //
            0.0, 0.2, 0.3, 2.0, 2.4, //
            -0.5, 0.5, 1.0, 1.6, 1.8,
        ];
        let unit_cost = [1.0, 2.0, 0.5];
        let curve = LpCurve::new(&ranks, &v, &unit_cost);
        let values: Vec<f64> = v.iter().map(|&x| x as f64).collect();
        let costs: Vec<f64> = (0..15).map(|i| ranks[i % 5] as f64 * unit_cost[i / 5]).collect();
        let mut solver = envs::oracle::MckpSolver::new();
        let mut out = [0usize; 3];
        for b in [0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 12.0, 20.0, 40.0] {
            let (exact, _) = solver.solve(&values, &costs, 5, b, &mut out).unwrap();
            let lp = curve.value(b);
            assert!(lp >= exact - 1e-9, "budget {b}: LP {lp} below the exact {exact}");
        }
        // Every rank at its largest: the whole hull is bought, and it ends where the plan does.
        let all: f64 = (0..3).map(|l| values[l * 5 + 4]).sum();
        assert!((curve.value(1e9) - all).abs() < 1e-9);
        // Only the cheapest plan fits at budget 0 (site 2's rank 0 has value −0.5).
        assert!((curve.value(0.0) - (-0.5)).abs() < 1e-9);
        // One site alone: the relaxation is exact at the hull's corners (costs 0, 1, 2, 4, 8 with
        // values 0, 1, 1.8, 3, 3.5 are all on it).
        let one = LpCurve::new(&ranks, &v[..5], &unit_cost[..1]);
        for (c, want) in [(0.0, 0.0), (1.0, 1.0), (2.0, 1.8), (4.0, 3.0), (8.0, 3.5)] {
            assert!((one.value(c) - want).abs() < 1e-6, "cost {c}: {} vs {want}", one.value(c));
        }
    }

    #[test]
    fn the_normal_quantile_inverts_the_normal_distribution_function() {
        for p in [1e-4, 0.005, 0.01, 0.02, 0.05, 0.3, 0.5, 0.9] {
            let z = normal_quantile(p);
            let back = 0.5 * libm::erfc(-z / std::f64::consts::SQRT_2);
            assert!((back - p).abs() < 1e-9 * p.max(1e-3), "p {p}: z {z}, Φ(z) {back}");
        }
        // Tabulated values.
        assert!((normal_quantile(0.01) + 2.326_348).abs() < 1e-5);
        assert!((normal_quantile(0.05) + 1.644_854).abs() < 1e-5);
        assert!(normal_quantile(0.5).abs() < 1e-9);
    }

    #[test]
    fn the_risk_aware_budget_avoids_the_violations_of_a_noisy_channel_estimate() {
        // A channel whose SNR estimate is three times noisier than the preset's safety margin
        // assumes (1.5 dB against a 1.5 dB margin): filling the conservative budget loses about
        // one round in six. The prior that infers the estimate's error plans below it.
        let text = envs::presets::embedded_text("wireless-rayleigh")
            .unwrap()
            .replace("layers = 8", "layers = 2")
            .replace("estimate_noise_db = 0.5", "estimate_noise_db = 1.5");
        let env = envs::presets::from_toml(&text, "noisy-estimate-test-env", None).unwrap();
        let spec = envs::EnvSpec::new(&env).unwrap();
        let mut table =
            envs::evaluate_baselines(&env, &[envs::Baseline::Uniform, envs::Baseline::Oracle], 64, 7).unwrap();
        for risk in [false, true] {
            let cfg = PriorConfig { enabled: true, infer: true, loss_floor: Some(0.5), risk, ..Default::default() };
            let mut p =
                PriorPolicy { prior: Prior::new(cfg, spec.rank_set.ranks()), use_dims: true, belief: Belief::new() };
            let mut row = envs::evaluate(&env, &mut p, 64, 7).unwrap();
            row.name = if risk { "risk".into() } else { "margin".into() };
            table.push(row);
        }
        table.fill_gap();
        eprintln!("{}", table.to_text());
        let row = |name: &str| table.rows.iter().find(|r| r.name == name).unwrap().clone();
        let (margin, risk) = (row("margin"), row("risk"));
        assert!(margin.violation_rate > 0.005, "the margin alone violates: {}", margin.violation_rate);
        assert!(
            risk.violation_rate < margin.violation_rate / 2.0,
            "{} vs {}",
            risk.violation_rate,
            margin.violation_rate
        );
        let (d, se) = table.paired_difference("risk", "margin").unwrap();
        assert!(d > 3.0 * se, "risk − margin: {d:.3} ± {se:.3}");
    }

    #[test]
    fn tail_share_moves_the_decay_estimate_toward_the_truth() {
        let ranks = [0, 1, 2, 4, 8, 16, 32, 64];
        let prior = Prior::new(PriorConfig::default(), &ranks);
        let tab = prior.tables(512);
        let (mut e, mut t) = (vec![0f32; 8], vec![0f32; 8]);
        // A v/o site (kind mean 0.55) whose true decay is 0.9, observed noise-free at rank 64
        // (index 7) and at rank 2 (index 2).
        power_law_tables(1.0, 0.9, 512, &ranks, &mut e, &mut t);
        let at64 = prior.beta_estimate(&tab, &row(1, 64, t[7]), 7);
        let at2 = prior.beta_estimate(&tab, &row(1, 2, t[2]), 2);
        let none = prior.beta_estimate(&tab, &row(1, 0, 0.0), 0);
        assert!((none - 0.55).abs() < 1e-9, "{none}");
        assert!((at64 - 0.9).abs() < 0.03, "rank 64: {at64}");
        assert!(at2 > 0.6 && at2 < at64, "rank 2: {at2} (weaker evidence, pulled toward 0.55)");
    }

    #[test]
    fn the_prior_alone_beats_uniform_and_adalora_on_a_small_preset() {
        let text = envs::presets::embedded_text("wireless-rayleigh").unwrap().replace("layers = 8", "layers = 2");
        let env = envs::presets::from_toml(&text, "small-test-env", None).unwrap();
        let spec = envs::EnvSpec::new(&env).unwrap();
        let mut table = envs::evaluate_baselines(
            &env,
            &[envs::Baseline::Uniform, envs::Baseline::Adalora, envs::Baseline::Oracle],
            64,
            99,
        )
        .unwrap();
        let cfg = PriorConfig { enabled: true, ..Default::default() };
        let mut policy =
            PriorPolicy { prior: Prior::new(cfg, spec.rank_set.ranks()), use_dims: true, belief: Belief::new() };
        table.push(envs::evaluate(&env, &mut policy, 64, 99).unwrap());
        eprintln!("{}", table.to_text());
        let (d, se) = table.paired_difference("prior", "uniform").unwrap();
        let (da, sea) = table.paired_difference("prior", "adalora").unwrap();
        let gap = table.rows[3].oracle_gap_closed.unwrap();
        assert!(
            d > 3.0 * se && da > 2.0 * sea && gap > 0.5,
            "prior − uniform {d:.3} ± {se:.3}, − adalora {da:.3} ± {sea:.3}, gap {gap:.3}"
        );
    }

    #[test]
    fn inference_beats_the_fixed_beliefs_where_the_environment_differs_from_them() {
        // Slow learning, a high loss floor, noisy sensitivities, 14 rounds: all away from the
        // beliefs (η 0.3, L∞ 0.5, 20 rounds).
        let text = envs::presets::embedded_text("budget")
            .unwrap()
            .replace("layers = 12", "layers = 2")
            .replace("learning_rate = 0.3", "learning_rate = 0.12")
            .replace("loss_floor = 0.5", "loss_floor = 0.9")
            .replace("rounds = 20", "rounds = 14")
            .replace("sensitivity_noise = 0.3", "sensitivity_noise = 0.5");
        let env = envs::presets::from_toml(&text, "mismatched-test-env", None).unwrap();
        assert_eq!((env.dynamics.learning_rate, env.dynamics.loss_floor, env.rounds), (0.12, 0.9, 14));
        let spec = envs::EnvSpec::new(&env).unwrap();
        let mut table =
            envs::evaluate_baselines(&env, &[envs::Baseline::Uniform, envs::Baseline::Oracle], 48, 5).unwrap();
        for infer in [false, true] {
            let cfg = PriorConfig { enabled: true, loss_floor: Some(0.5), infer, ..Default::default() };
            let mut p =
                PriorPolicy { prior: Prior::new(cfg, spec.rank_set.ranks()), use_dims: true, belief: Belief::new() };
            let mut row = envs::evaluate(&env, &mut p, 48, 5).unwrap();
            row.name = if infer { "inferring".into() } else { "fixed".into() };
            table.push(row);
        }
        table.fill_gap();
        eprintln!("{}", table.to_text());
        let (d, se) = table.paired_difference("inferring", "fixed").unwrap();
        assert!(d > 3.0 * se, "inferring − fixed beliefs: {d:.4} ± {se:.4}");
    }
}
