//! Online inference of an episode's hidden constants from its own observations.
//!
//! **Why.** The prior ([`crate::prior`]) values a plan with a model of the run: the horizon,
//! the per-round learning rate η, the loss floor L∞, each site's spectral decay β and its
//! sensitivity w. With fixed beliefs it is only right where the environment matches them; on
//! the default training distribution these constants vary several-fold. A [`Belief`] keeps the
//! episode's history (one observation per round) and turns it into estimates; the fixed
//! beliefs of [`PriorConfig`] stay only as the starting point and as the regularizer of the
//! fits. It never reads hidden state: in a real fine-tuning run the same history exists.
//!
//! What is inferred, and from what (the dynamics are those of `envs::state`):
//!
//! - **Horizon**: `progress` is round / rounds, so one increment of it gives the run's length
//!   exactly; before the second observation the belief `rounds` is used.
//! - **Decay β per site**: every round at rank r ≥ 2 measures ln `tail_share` (log-normal
//!   noise). The measurements are averaged per site and rank, inverted on the prior's β grid
//!   and combined by precision; a site keeps what it measured at a high rank after it shrinks.
//!   The mean per projection kind is pooled over the episode's sites (empirical Bayes) with
//!   the configured kind means as the prior, at spread `beta_role_sd`. The noise level itself is
//!   the pooled within-(site, rank) variance of those measurements, with `tail_noise` as a
//!   prior worth [`NOISE_PRIOR_DOF`] degrees of freedom.
//! - **Sensitivity w**: constant over an episode and observed with fresh noise every round, so
//!   the mean of ln `sensitivity` over the rounds, with the current round's
//!   `grad_norm / √(1 − q̂)` as one more measurement.
//! - **η and L∞** (maximum a posteriori): for each η of a log grid the captured shares q̂_l are
//!   simulated along the ranks the episode actually held (shrinking keeps q·E_new/E_old, a
//!   round with progress moves q toward E by η; a round in which the loss did not move made no
//!   progress: skipped or over budget). The observed 1 − loss_ratio is then u·Σ_l ŵ_l·q̂_l with
//!   u = 1/(L∞ + Σw), a linear fit for u given η. The η (and its u) with the least squared
//!   error plus the log-normal prior around the belief `eta` and the normal prior around
//!   1/(`loss_floor` + Σw) wins.
//! - **The budget estimate's error** (for `prior.risk`): after a round that sent a plan of cost
//!   C when the estimated budget was B, the next observation's `last_cost_ratio` c = C / B_true
//!   gives x = ln(B_true / B) exactly. Their mean and spread over the episode, with a prior,
//!   say how far above or below the estimate a plan may go at a given risk of violation.
//!
//! [`PriorConfig`]: crate::prior::PriorConfig

use serde::{Deserialize, Serialize};

use envs::{GLOBAL_FEATURES, GlobalFeature, SITE_FEATURES, SiteFeature};

/// Degrees of freedom the configured `tail_noise` is worth in the pooled noise estimate.
pub const NOISE_PRIOR_DOF: f64 = 20.0;

/// Points of the η grid of the dynamics fit, log-spaced from [`ETA_MIN`] to [`ETA_MAX`].
pub const ETA_GRID: usize = 32;

/// Smallest η the fit considers.
pub const ETA_MIN: f64 = 0.03;

/// Largest η the fit considers.
pub const ETA_MAX: f64 = 0.95;

/// One environment's episode history, from which the prior infers what it would otherwise
/// assume. Start one per environment; [`Belief::observe`] resets it when a new episode begins
/// (progress 0, or a different site count).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Belief {
    n_sites: usize,
    k: usize,
    /// `progress` of every observation of the episode.
    progress: Vec<f32>,
    /// `loss_ratio` of every observation.
    loss_ratio: Vec<f32>,
    /// The rank index each site held at every observation (`observations × n_sites`).
    held: Vec<u8>,
    /// Σ ln `sensitivity` per site.
    ln_sens: Vec<f64>,
    /// Σ ln `tail_share`, Σ (ln `tail_share`)² and the count, per site and rank index.
    tail_sum: Vec<f64>,
    tail_sq: Vec<f64>,
    tail_n: Vec<u32>,
    /// The last round's send, (estimated budget, plan cost), until the next observation's
    /// `last_cost_ratio` turns it into a measurement of the budget error.
    #[serde(default)]
    pending_send: Option<(f64, f64)>,
    /// Σ x, Σ x² and the count of x = ln(B_true / B_estimated) over the episode's sends.
    #[serde(default)]
    budget_err: [f64; 3],
}

/// The inferred error of the estimated budget, x = ln(B_true / B_estimated): the predictive
/// distribution of the next round's x (normal).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetError {
    /// Posterior mean of x.
    pub mean: f64,
    /// Predictive standard deviation of x (the spread plus the mean's uncertainty).
    pub sd: f64,
    /// Measurements so far.
    pub n: usize,
}

/// The inferred dynamics of an episode.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dynamics {
    /// Per-round learning rate η.
    pub eta: f64,
    /// u = 1/(L∞ + Σw): the observed 1 − loss_ratio is u·Σ_l w_l·q_l.
    pub u: f64,
}

impl Belief {
    /// An empty belief (no observation yet).
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of observations of this episode so far.
    pub fn observations(&self) -> usize {
        self.progress.len()
    }

    /// Adds this round's observation (`global`: one global row; `sites`: the site rows;
    /// `current`: each site's current rank index; `k`: the rank set's size). A new episode
    /// (progress 0 or not after the last one, or another site count) starts the history over.
    pub fn observe(&mut self, global: &[f32], sites: &[f32], current: &[usize], k: usize) {
        debug_assert_eq!(global.len(), GLOBAL_FEATURES);
        let n = current.len();
        let progress = global[GlobalFeature::Progress];
        let new_episode =
            progress <= 0.0 || self.progress.last().is_some_and(|&p| progress <= p) || n != self.n_sites || k != self.k;
        if new_episode {
            *self = Belief {
                n_sites: n,
                k,
                ln_sens: vec![0.0; n],
                tail_sum: vec![0.0; n * k],
                tail_sq: vec![0.0; n * k],
                tail_n: vec![0; n * k],
                ..Default::default()
            };
        }
        if let Some((budget, cost)) = self.pending_send.take() {
            let c = global[GlobalFeature::LastCostRatio] as f64;
            if c > 0.0 && cost > 0.0 && budget > 0.0 {
                let x = (cost / (c * budget)).ln();
                self.budget_err[0] += x;
                self.budget_err[1] += x * x;
                self.budget_err[2] += 1.0;
            }
        }
        self.progress.push(progress);
        self.loss_ratio.push(global[GlobalFeature::LossRatio]);
        for (l, (row, &j)) in sites.chunks_exact(SITE_FEATURES).zip(current).enumerate() {
            self.held.push(j as u8);
            self.ln_sens[l] += (row[SiteFeature::Sensitivity] as f64).max(1e-6).ln();
            let t = row[SiteFeature::TailShare] as f64;
            if t > 0.0 && t.is_finite() {
                let x = t.ln();
                self.tail_sum[l * k + j] += x;
                self.tail_sq[l * k + j] += x * x;
                self.tail_n[l * k + j] += 1;
            }
        }
    }

    /// Records what this round sent: a plan of cost `cost` (0 for a skipped round) when the
    /// estimated budget was `budget`. The next observation's `last_cost_ratio` measures the
    /// estimate's error from it ([`Belief::budget_error`]).
    pub fn sent(&mut self, budget: f64, cost: f64) {
        self.pending_send = (cost > 0.0).then_some((budget, cost));
    }

    /// The predictive distribution of the next round's x = ln(B_true / B_estimated): a
    /// normal with mean 0 worth one measurement and spread `prior_sd` worth
    /// [`NOISE_PRIOR_DOF`]` / 5` degrees of freedom, updated with the episode's measurements.
    pub fn budget_error(&self, prior_sd: f64) -> BudgetError {
        let [sx, sxx, n] = self.budget_err;
        let dof0 = NOISE_PRIOR_DOF / 5.0;
        let mean = sx / (n + 1.0);
        let ss = if n > 0.0 { (sxx - sx * sx / n).max(0.0) } else { 0.0 };
        let var = (dof0 * prior_sd * prior_sd + ss) / (dof0 + n);
        BudgetError { mean, sd: (var * (1.0 + 1.0 / (n + 1.0))).sqrt(), n: n as usize }
    }

    /// The run's length in rounds: 1 / (the last progress increment), or `belief` before a
    /// second observation.
    pub fn rounds(&self, belief: f64) -> f64 {
        match self.progress[..] {
            [.., a, b] if b > a => (1.0 / (b - a) as f64).round().max(1.0),
            _ => belief,
        }
    }

    /// Mean ln `sensitivity` of site `l` over the episode and the number of measurements.
    pub fn mean_ln_sensitivity(&self, l: usize) -> (f64, usize) {
        let m = self.observations();
        (self.ln_sens[l] / m.max(1) as f64, m)
    }

    /// Mean ln `tail_share` of site `l` at rank index `j` and the number of measurements.
    pub fn mean_ln_tail(&self, l: usize, j: usize) -> (f64, u32) {
        let i = l * self.k + j;
        let m = self.tail_n[i];
        (self.tail_sum[i] / m.max(1) as f64, m)
    }

    /// Standard deviation of the ln `tail_share` noise: the pooled within-(site, rank) variance
    /// of the measurements, with `belief` worth [`NOISE_PRIOR_DOF`] degrees of freedom.
    pub fn tail_noise(&self, belief: f64) -> f64 {
        let (mut ss, mut dof) = (0.0, 0.0);
        for ((&s, &q), &m) in self.tail_sum.iter().zip(&self.tail_sq).zip(&self.tail_n) {
            if m >= 2 {
                ss += (q - s * s / m as f64).max(0.0);
                dof += (m - 1) as f64;
            }
        }
        ((NOISE_PRIOR_DOF * belief * belief + ss) / (NOISE_PRIOR_DOF + dof)).sqrt()
    }

    /// Whether a round with progress happened between observations `t − 1` and `t`: the loss
    /// moves in every round that trains (and stays put when one is skipped or over budget).
    fn progressed(&self, t: usize) -> bool {
        self.loss_ratio[t] != self.loss_ratio[t - 1]
            || self.held[(t - 1) * self.n_sites..t * self.n_sites]
                != self.held[t * self.n_sites..(t + 1) * self.n_sites]
    }

    /// Simulates the captured shares along the episode's held ranks for every learning rate
    /// of `etas` at once (the inner loop runs over η, so it vectorizes), with `energy` each
    /// site's E(r) table (`n_sites × k`) and `w` the sensitivities. Returns per η the sums
    /// Σ_t C_t², Σ_t C_t·y_t and Σ_t y_t² over the observations t ≥ 1, where C_t = Σ_l w_l·q_l
    /// and y_t = 1 − loss_ratio_t, and leaves the final shares in `q` (`n_sites × |etas|`).
    fn simulate<const G: usize>(
        &self,
        etas: &[f64; G],
        energy: &[f64],
        w: &[f64],
        q: &mut [[f64; G]],
    ) -> [[f64; 3]; G] {
        let (n, k) = (self.n_sites, self.k);
        q.iter_mut().for_each(|x| *x = [0.0; G]);
        let mut c = [0.0f64; G];
        let mut sums = [[0.0f64; 3]; G];
        for t in 1..self.observations() {
            if self.progressed(t) {
                c = [0.0; G];
                for l in 0..n {
                    let (old, new) = (self.held[(t - 1) * n + l] as usize, self.held[t * n + l] as usize);
                    let (e_old, e_new) = (energy[l * k + old], energy[l * k + new]);
                    // Shrinking keeps the captured share in proportion; then a step of η toward E.
                    let keep = if e_new < e_old && e_old > 0.0 { e_new / e_old } else { 1.0 };
                    let ql = &mut q[l];
                    for g in 0..G {
                        let x = ql[g] * keep;
                        ql[g] = x + etas[g] * (e_new - x).max(0.0);
                        c[g] += w[l] * ql[g];
                    }
                }
            }
            let y = 1.0 - self.loss_ratio[t] as f64;
            for g in 0..G {
                sums[g][0] += c[g] * c[g];
                sums[g][1] += c[g] * y;
                sums[g][2] += y * y;
            }
        }
        sums
    }

    /// The MAP fit of η and u = 1/(L∞ + Σw) (see the module doc), given each site's energy
    /// table (`n_sites × k`) and sensitivity `w` (summing to Σw), and the beliefs: `eta`
    /// (log-normal, standard deviation `eta_sd` in ln η) and `u0` (normal, `u_sd`). Also
    /// returns the captured shares q̂ at the fitted η, written to `q`.
    pub fn fit_dynamics(
        &self,
        energy: &[f64],
        w: &[f64],
        prior: Dynamics,
        eta_sd: f64,
        u_sd: f64,
        q: &mut [f64],
    ) -> Dynamics {
        // Squared error of the loss fit in units of this (model error, not observation noise:
        // the loss is observed exactly, but ŵ and Ê are estimates).
        const LOSS_SD: f64 = 0.01;
        if self.observations() < 2 {
            q.iter_mut().for_each(|x| *x = 0.0);
            return prior;
        }
        let (a, b) = (1.0 / (LOSS_SD * LOSS_SD), 1.0 / (u_sd * u_sd));
        // The posterior cost of η from its sums, with u at its optimum given η (closed form).
        let cost = |eta: f64, [cc, cy, yy]: [f64; 3]| -> (f64, Dynamics) {
            let u = ((a * cy + b * prior.u) / (a * cc + b)).max(1e-3);
            let sse = yy - 2.0 * u * cy + u * u * cc;
            let z = (eta / prior.eta).ln() / eta_sd;
            (a * sse + b * (u - prior.u).powi(2) + z * z, Dynamics { eta, u })
        };
        // A log grid, then the vertex of the parabola through the best point and its two
        // neighbours (in ln η), kept if it is better.
        let (lo, hi) = (ETA_MIN.ln(), ETA_MAX.ln());
        let step = (hi - lo) / (ETA_GRID - 1) as f64;
        let etas: [f64; ETA_GRID] = std::array::from_fn(|g| (lo + step * g as f64).exp());
        let mut grid_q = vec![[0.0; ETA_GRID]; self.n_sites];
        let sums = self.simulate(&etas, energy, w, &mut grid_q);
        let costs: Vec<(f64, Dynamics)> = (0..ETA_GRID).map(|g| cost(etas[g], sums[g])).collect();
        let g = (0..ETA_GRID).min_by(|&i, &j| costs[i].0.total_cmp(&costs[j].0)).unwrap_or(0);
        let mut best = (costs[g].0, costs[g].1, g);
        if g > 0 && g + 1 < ETA_GRID {
            let (c0, c1, c2) = (costs[g - 1].0, costs[g].0, costs[g + 1].0);
            let curvature = c0 - 2.0 * c1 + c2;
            if curvature > 0.0 {
                let x = lo + step * (g as f64 + 0.5 * (c0 - c2) / curvature);
                let mut one = vec![[0.0; 1]; self.n_sites];
                let s = self.simulate(&[x.exp()], energy, w, &mut one);
                let (c, d) = cost(x.exp(), s[0]);
                if c < best.0 {
                    q.iter_mut().zip(&one).for_each(|(q, o)| *q = o[0]);
                    return d;
                }
            }
        }
        best.2 = g;
        q.iter_mut().zip(&grid_q).for_each(|(q, o)| *q = o[best.2]);
        best.1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A global row at `progress` with `loss_ratio`, and `n` site rows at rank index `j`
    /// (rank feature j / 4 of the set [0, 1, 2, 4]).
    fn rows(progress: f32, loss_ratio: f32, n: usize, sens: f32) -> (Vec<f32>, Vec<f32>) {
        let mut g = vec![0f32; GLOBAL_FEATURES];
        g[GlobalFeature::Progress] = progress;
        g[GlobalFeature::LossRatio] = loss_ratio;
        let mut s = vec![0f32; n * SITE_FEATURES];
        for row in s.chunks_exact_mut(SITE_FEATURES) {
            row[SiteFeature::Sensitivity] = sens;
        }
        (g, s)
    }

    #[test]
    fn the_horizon_comes_from_one_progress_increment() {
        let mut b = Belief::new();
        let (g, s) = rows(0.0, 1.0, 2, 1.0);
        b.observe(&g, &s, &[1, 1], 4);
        assert_eq!(b.rounds(20.0), 20.0, "one observation: the belief");
        let (g, s) = rows(1.0 / 13.0, 0.9, 2, 1.0);
        b.observe(&g, &s, &[1, 1], 4);
        assert_eq!(b.rounds(20.0), 13.0);
        // Progress 0 again: a new episode.
        let (g, s) = rows(0.0, 1.0, 2, 1.0);
        b.observe(&g, &s, &[1, 1], 4);
        assert_eq!((b.observations(), b.rounds(20.0)), (1, 20.0));
    }

    #[test]
    fn the_dynamics_fit_recovers_eta_and_the_loss_floor() {
        // Two sites with known energies and sensitivities, ranks grown and shrunk along the
        // way, the loss written by the environment's own update rule.
        let (k, n) = (4, 2);
        let energy = [0.0, 0.3, 0.5, 0.8, 0.0, 0.2, 0.6, 0.9];
        let w = [0.7, 0.3];
        let plan: [[usize; 2]; 10] = [[0, 0], [3, 1], [3, 1], [3, 2], [1, 3], [1, 3], [3, 3], [3, 3], [2, 3], [2, 3]];
        for (eta, floor) in [(0.12, 0.9), (0.5, 0.2), (0.3, 0.5)] {
            let mut b = Belief::new();
            let mut q = [0.0f64; 2];
            for (t, ranks) in plan.iter().enumerate() {
                if t > 0 {
                    let prev = plan[t - 1];
                    for l in 0..n {
                        let (e_old, e_new) = (energy[l * k + prev[l]], energy[l * k + ranks[l]]);
                        if e_new < e_old {
                            q[l] *= e_new / e_old;
                        }
                        q[l] += eta * (e_new - q[l]).max(0.0);
                    }
                }
                let loss = floor + 1.0 - q.iter().zip(&w).map(|(q, w)| q * w).sum::<f64>();
                let (g, s) = rows(t as f32 / 20.0, (loss / (floor + 1.0)) as f32, n, 1.0);
                b.observe(&g, &s, ranks, k);
            }
            let mut qhat = [0.0; 2];
            let start = Dynamics { eta: 0.3, u: 1.0 / 1.5 };
            // Wide priors: on exact data the fit alone must find the truth (the default priors
            // pull a 10-round fit by a few percent, by design).
            let fit = b.fit_dynamics(&energy, &w, start, 3.0, 1.0, &mut qhat);
            let floor_hat = 1.0 / fit.u - 1.0;
            assert!((fit.eta / eta).ln().abs() < 0.1, "η {eta}: fitted {}", fit.eta);
            assert!((floor_hat - floor).abs() < 0.05, "L∞ {floor}: fitted {floor_hat}");
            assert!(qhat.iter().zip(&q).all(|(a, b)| (a - b).abs() < 0.03), "q̂ {qhat:?} vs {q:?}");
        }
    }

    #[test]
    fn the_budget_error_is_measured_from_the_next_rounds_cost_ratio() {
        // Each round sends a plan of cost 50 against an estimate of 100 while the true budget is
        // 100·e^x with x ~ N(0.3, 0.2²); the next observation's last_cost_ratio = 50 / B_true.
        let mut b = Belief::new();
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(11);
        let mut last_c = 0.0f32;
        for t in 0..200 {
            let (mut g, s) = rows(t as f32 / 400.0, 1.0, 2, 1.0);
            g[GlobalFeature::LastCostRatio] = last_c;
            b.observe(&g, &s, &[1, 1], 4);
            // A skipped round in between measures nothing.
            if t % 5 == 4 {
                b.sent(100.0, 0.0);
                last_c = 0.0;
                continue;
            }
            b.sent(100.0, 50.0);
            let z: f64 = rand_distr::Distribution::sample(&rand_distr::StandardNormal, &mut rng);
            last_c = (50.0 / (100.0 * (0.3 + 0.2 * z).exp())) as f32;
        }
        let err = b.budget_error(0.1);
        assert_eq!(err.n, 160, "one measurement per sent round that was followed by an observation");
        assert!((err.mean - 0.3).abs() < 0.04, "mean {}", err.mean);
        assert!((err.sd - 0.2).abs() < 0.03, "sd {}", err.sd);
        // Before any measurement: the prior (mean 0, the configured spread widened by the mean's
        // own uncertainty).
        let fresh = Belief::new().budget_error(0.1);
        assert_eq!((fresh.mean, fresh.n), (0.0, 0));
        assert!((fresh.sd - 0.1 * 2f64.sqrt()).abs() < 1e-12, "{}", fresh.sd);
    }

    #[test]
    fn the_tail_noise_is_the_pooled_spread_of_repeated_measurements() {
        let mut b = Belief::new();
        let (k, n) = (4, 50);
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(3);
        for t in 0..12 {
            let (g, mut s) = rows(t as f32 / 20.0, 1.0, n, 1.0);
            for row in s.chunks_exact_mut(SITE_FEATURES) {
                let z: f64 = rand_distr::Distribution::sample(&rand_distr::StandardNormal, &mut rng);
                row[SiteFeature::TailShare] = (0.05f64.ln() + 0.35 * z).exp() as f32;
            }
            b.observe(&g, &s, &vec![3; n], k);
        }
        let sd = b.tail_noise(0.2);
        assert!((sd - 0.35).abs() < 0.03, "{sd}");
    }
}
