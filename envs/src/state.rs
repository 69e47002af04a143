//! [`EnvState`]: one environment's hidden site parameters and training state, its dynamics
//! and reward, and the observation it emits each round.
//!
//! # One round
//! 1. At the start of round t the environment draws the data proxies (token entropy, OOV rate),
//!    the resource's true budget B_t and its noisy estimate, and per-site noisy signals, and
//!    emits the [`crate::Observation`].
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
//!    at once (auto-reset) and reports the episode in [`crate::VecEnv::finished`].
//!
//! All randomness comes from one ChaCha8 stream per environment, and the number of draws per
//! round does not depend on the actions, so two policies evaluated on the same seed face the
//! same spectra, sensitivities and channel realisations (common random numbers).

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use crate::observation::{
    BudgetRatioLags, GlobalValues, SITE_FEATURES, SiteValues, bandwidth_share, budget_ratio, resource_level,
};
use crate::resource::ResourceState;
use crate::sites::{explicit_tables, power_law_tables};
use crate::spec::EnvSpec;

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
    // Crate-visible fields: the oracle (`crate::oracle`) values plans with the hidden state and
    // the stepper (`crate::vec_env`) reads the current ranks; outside the crate only the
    // accessors below reach them.
    rng: ChaCha8Rng,
    pub(crate) round: u32,
    episodes: u64,
    // Hidden per-site parameters of the episode.
    pub(crate) w: Vec<f32>,
    beta: Vec<f32>,
    pub(crate) total_energy: Vec<f32>,
    pub(crate) energy: Vec<f32>,
    tail: Vec<f32>,
    // Dynamic per-site state.
    pub(crate) captured: Vec<f32>,
    pub(crate) rank_idx: Vec<u8>,
    pub(crate) res: ResourceState,
    entropy: f64,
    oov: f64,
    pub(crate) eta: f64,
    loss: f64,
    initial_loss: f64,
    last_violation: bool,
    last_cost_ratio: f64,
    budget_hist: BudgetRatioLags,
    ep_return: f64,
    ep_used: f64,
    ep_violations: u32,
    #[serde(default)]
    ep_skips: u32,
}

impl EnvState {
    /// A fresh environment seeded with `seed`, at round 0 of its first episode.
    pub(crate) fn new(spec: &EnvSpec, seed: u64) -> Self {
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
            budget_hist: BudgetRatioLags::default(),
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
        self.budget_hist = BudgetRatioLags::filled(self.budget_ratio(spec));
    }

    /// Whether the state's per-site tables have the shape of `spec` (a snapshot of another
    /// preset's environments does not).
    pub(crate) fn fits(&self, spec: &EnvSpec) -> bool {
        self.w.len() == spec.n_sites() && self.energy.len() == spec.n_sites() * spec.rank_set.len()
    }

    /// The `budget_ratio_est` feature this round.
    fn budget_ratio(&self, spec: &EnvSpec) -> f32 {
        budget_ratio(self.res.est_budget, spec.max_plan_cost)
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

    /// Writes the observation of the current round into one environment's rows. Draws exactly
    /// one 64-bit word per site (the observation noise).
    pub(crate) fn write_obs(&mut self, spec: &EnvSpec, global: &mut [f32], sites: &mut [f32]) {
        let p = &spec.preset;
        let n = spec.n_sites();
        let k = spec.rank_set.len();
        let rmax = spec.rank_set.max() as f32;
        let ranks = spec.rank_set.ranks();
        let wscale = n as f32 / p.sensitivity.total as f32;
        let unmeasured = p.observation.unmeasured_first_round && self.round == 0;
        // The gradient-norm reading's sensitivity term w^γ, rescaled to the sensitivities' total
        // (γ = 1 reads w itself, bit for bit).
        let gamma = p.observation.grad_exponent as f32;
        let grad_scale = if gamma == 1.0 {
            1.0
        } else {
            let powered: f32 = self.w.iter().map(|w| w.powf(gamma)).sum();
            self.w.iter().sum::<f32>() / powered.max(f32::MIN_POSITIVE)
        };
        let tail_scale = p.observation.tail_scale as f32;
        let mut rank_sum = 0.0f32;
        for (l, row) in sites.chunks_exact_mut(SITE_FEATURES).enumerate() {
            let j = self.rank_idx[l] as usize;
            let r = ranks[j] as f32;
            rank_sum += r;
            let noise = spec.noise.draw(&mut self.rng);
            let w = self.w[l] * wscale;
            SiteValues {
                rank: r / rmax,
                rank_log: spec.rank_log[j],
                static_features: spec.static_site_features(l),
                sensitivity: if unmeasured { 1.0 } else { w * noise.sensitivity },
                grad_norm: if unmeasured {
                    1.0
                } else {
                    let w_grad = if gamma == 1.0 { w } else { self.w[l].powf(gamma) * grad_scale * wscale };
                    w_grad * (1.0 - self.captured[l]).max(0.0).sqrt() * noise.grad_norm
                },
                tail_share: if tail_scale == 1.0 {
                    self.tail[l * k + j] * noise.tail_share
                } else {
                    (self.tail[l * k + j] * tail_scale).min(1.0) * noise.tail_share
                },
            }
            .write(row);
        }
        GlobalValues {
            resource: spec.resource.kind(),
            budget_ratio_est: self.budget_ratio(spec),
            budget_ratio_lags: self.budget_hist,
            resource_level: resource_level(&spec.resource, &self.res),
            bandwidth: bandwidth_share(&spec.resource, &self.res, spec.max_bandwidth),
            token_entropy: (p.dynamics.entropy_mean + self.entropy).clamp(0.0, 1.0) as f32,
            oov_rate: (p.dynamics.oov_mean + self.oov).clamp(0.0, 1.0) as f32,
            progress: self.round as f32 / p.rounds as f32,
            loss_ratio: (self.loss / self.initial_loss) as f32,
            last_violation: self.last_violation,
            last_cost_ratio: self.last_cost_ratio.clamp(0.0, p.reward.violation_cost_cap) as f32,
            mean_rank: rank_sum / (n as f32 * rmax),
            n_sites: n,
        }
        .write(global);
    }

    /// Plays one round with rank indices `idx` (already validated). `site_rewards` receives the reward split over the sites, summing to the
    /// round's reward: each site's own loss term w_l·(1 − q_l) plus an equal share of the floor,
    /// its own FLOPs and perturbation terms, and a share of the resource terms (cost and violation
    /// penalty) proportional to its share of the plan's cost.
    pub(crate) fn play(
        &mut self,
        spec: &EnvSpec,
        idx: &[u8],
        cost: f64,
        skip: bool,
        site_rewards: &mut [f32],
    ) -> RoundOutcome {
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
        let d = &p.dynamics;
        let final_loss = rw.loss_term == crate::presets::LossTerm::Final;
        let loss_before = self.loss;
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
            let q_before = q;
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
            q += site_rate(d, self.eta, e_new, q) * (e_new - q).max(0.0);
            self.captured[l] = q;
            let site_resid = (self.w[l] * (1.0 - q)) as f64;
            resid += site_resid;
            let site_flops = if want_flops { ranks[j] as f64 * spec.flops_per_rank[l] } else { 0.0 };
            flops += site_flops;
            // `final`: the site's progress this round (negative when a shrink lost captured energy).
            let loss_part =
                if final_loss { (self.w[l] * (q - q_before)) as f64 } else { -p.dynamics.loss_floor / n - site_resid };
            site_rewards[l] = (loss_part
                - rw.cost_coef * c * share(l)
                - rw.flops_coef * site_flops / rw.flops_scale
                - rw.perturbation_coef * site_pert / n) as f32;
        }
        self.loss = p.dynamics.loss_floor + resid;
        let loss_part = if final_loss { loss_before - self.loss } else { -self.loss };
        let reward =
            loss_part - rw.cost_coef * c - rw.flops_coef * flops / rw.flops_scale - rw.perturbation_coef * pert / n;
        self.last_violation = false;
        self.last_cost_ratio = c;
        RoundOutcome { reward, loss: self.loss, cost_ratio: c, cost, violation: false, skipped: false }
    }

    /// A skipped round: nothing is sent and nothing is trained, so there is no cost, no progress
    /// and no resize; the reward is the loss carried through the round (0 with
    /// `reward.loss_term = "final"`: no progress). Each site is credited with its own residual
    /// plus an equal share of the floor.
    fn play_skip(&mut self, spec: &EnvSpec, site_rewards: &mut [f32]) -> RoundOutcome {
        let n = site_rewards.len().max(1) as f64;
        let floor = spec.preset.dynamics.loss_floor;
        let final_loss = spec.preset.reward.loss_term == crate::presets::LossTerm::Final;
        for (l, r) in site_rewards.iter_mut().enumerate() {
            *r = if final_loss { 0.0 } else { (-floor / n - (self.w[l] * (1.0 - self.captured[l])) as f64) as f32 };
        }
        self.ep_skips += 1;
        self.last_violation = false;
        self.last_cost_ratio = 0.0;
        RoundOutcome {
            reward: if final_loss { 0.0 } else { -self.loss },
            loss: self.loss,
            cost_ratio: 0.0,
            cost: 0.0,
            violation: false,
            skipped: true,
        }
    }

    /// Advances after a round; returns the episode summary when the episode ended (the state is
    /// then already reset).
    pub(crate) fn advance(&mut self, spec: &EnvSpec, env: usize, reward: f64) -> Option<EpisodeSummary> {
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
        self.budget_hist.push(self.budget_ratio(spec));
        self.begin_round(spec);
        None
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

    /// Site `l`'s age under the power law of `dynamics.decay_exponent` (see
    /// [`crate::presets::DynamicsConfig::round_rate`]): the rounds a site training from nothing at
    /// its current rank would have needed to leave its gap.
    pub fn site_age(&self, spec: &EnvSpec, l: usize) -> f64 {
        let e = self.energy[l * spec.rank_set.len() + self.rank_idx[l] as usize];
        spec.preset.dynamics.age_of_gap(gap_share(e, self.captured[l]))
    }
}

/// The share of capacity `e` not yet captured (1 for an empty capacity: nothing to age).
pub(crate) fn gap_share(e: f32, q: f32) -> f64 {
    if e > 0.0 { (((e - q) / e) as f64).clamp(0.0, 1.0) } else { 1.0 }
}

/// The rate at which a site of capacity `e` with `q` captured closes its gap this round: `eta`
/// (this round's η with its entropy effect) under the exponential law; under the power law the
/// law's rate at the site's age, with the same entropy effect.
pub(crate) fn site_rate(d: &crate::presets::DynamicsConfig, eta: f64, e: f32, q: f32) -> f32 {
    if d.decay_exponent.is_none() {
        return eta as f32;
    }
    let effect = if d.learning_rate > 0.0 { eta / d.learning_rate } else { 0.0 };
    (d.round_rate(d.age_of_gap(gap_share(e, q))) * effect).clamp(0.0, 1.0) as f32
}
