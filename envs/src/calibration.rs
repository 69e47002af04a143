//! Calibration files: site shapes, measured update spectra and sensitivities from a real run.
//!
//! Format (JSON, `format_version` 1):
//!
//! ```json
//! {
//!   "format_version": 1,
//!   "model": "tiny-llama",
//!   "sites": [
//!     { "name": "layers.0.self_attn.q_proj", "d_in": 256, "d_out": 256, "role": "q", "layer": 0,
//!       "spectrum": [3.1, 1.9, 1.2, 0.8], "tail_energy": 0.4, "sensitivity": 0.9 }
//!   ]
//! }
//! ```
//!
//! - `spectrum`: singular values of the site's (ideal or long-run) update ΔW, descending,
//!   non-negative. Any length ≥ 1; a real run writes the singular values of B·A at a high rank.
//! - `tail_energy`: Σ σ_k² beyond the listed values (optional, default 0, must be ≥ 0).
//! - `sensitivity`: relative loss sensitivity (e.g. normalised AdaLoRA importance), > 0;
//!   rescaled so the sum over sites equals the preset's `sensitivity.total`.
//! - `role`: one of q, k, v, o, gate, up, down, other. `layer`: 0-based layer index.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::EnvError;
use crate::sites::{Role, Site};

/// The current calibration format version.
pub const FORMAT_VERSION: u32 = 1;

/// Largest singular value or sensitivity a calibration file may hold. Only ratios matter (each
/// spectrum's energy and the sensitivities are normalized), so any scale works up to where the
/// squares and sums would overflow.
pub const MAX_VALUE: f64 = 1e100;
/// Largest matrix side a calibration file may declare.
pub const MAX_DIM: u32 = 1 << 20;

/// A calibration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    /// Must equal [`FORMAT_VERSION`].
    pub format_version: u32,
    /// Free-form model name.
    #[serde(default)]
    pub model: String,
    /// One entry per adapted site.
    pub sites: Vec<CalibratedSite>,
}

/// One site of a calibration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibratedSite {
    /// Module name.
    pub name: String,
    /// Input dimension.
    pub d_in: u32,
    /// Output dimension.
    pub d_out: u32,
    /// Projection kind.
    #[serde(default = "other")]
    pub role: Role,
    /// Layer index.
    #[serde(default)]
    pub layer: u32,
    /// Singular values of the update, descending.
    pub spectrum: Vec<f64>,
    /// Energy beyond the listed singular values.
    #[serde(default)]
    pub tail_energy: f64,
    /// Relative loss sensitivity.
    pub sensitivity: f64,
}

fn other() -> Role {
    Role::Other
}

impl Calibration {
    /// Reads and checks a calibration file.
    pub fn load(path: &Path) -> Result<Self, EnvError> {
        let text = std::fs::read_to_string(path).map_err(|e| EnvError::Calibration {
            file: path.display().to_string(),
            message: format!("cannot read: {e}"),
        })?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Parses and checks calibration JSON; `file` names it in errors.
    pub fn from_json(text: &str, file: &str) -> Result<Self, EnvError> {
        let c: Calibration = serde_json::from_str(text)
            .map_err(|e| EnvError::Calibration { file: file.into(), message: e.to_string() })?;
        c.check().map_err(|message| EnvError::Calibration { file: file.into(), message })?;
        Ok(c)
    }

    /// Checks ranges; the message names the offending key.
    pub fn check(&self) -> Result<(), String> {
        if self.format_version != FORMAT_VERSION {
            return Err(format!("key `format_version` = {}: allowed: {FORMAT_VERSION}", self.format_version));
        }
        if self.sites.is_empty() {
            return Err("key `sites`: allowed: a non-empty list".into());
        }
        for (i, s) in self.sites.iter().enumerate() {
            let k = |f: &str| format!("key `sites[{i}].{f}` (site {})", s.name);
            if s.d_in == 0 || s.d_out == 0 || s.d_in > MAX_DIM || s.d_out > MAX_DIM {
                return Err(format!("{}: allowed: d_in and d_out from 1 to {MAX_DIM}", k("d_in")));
            }
            if s.spectrum.is_empty() || s.spectrum.iter().any(|x| !(x.is_finite() && (0.0..=MAX_VALUE).contains(x))) {
                return Err(format!(
                    "{} = {:?}: allowed: a non-empty list of numbers in [0, {MAX_VALUE:e}]",
                    k("spectrum"),
                    s.spectrum
                ));
            }
            if s.spectrum.windows(2).any(|w| w[1] > w[0]) {
                return Err(format!("{}: allowed: singular values in descending order", k("spectrum")));
            }
            if s.spectrum.len() > s.d_in.min(s.d_out) as usize {
                return Err(format!(
                    "{}: {} values, allowed: at most min(d_in, d_out) = {}",
                    k("spectrum"),
                    s.spectrum.len(),
                    s.d_in.min(s.d_out)
                ));
            }
            if !(s.tail_energy.is_finite() && (0.0..=MAX_VALUE * MAX_VALUE).contains(&s.tail_energy)) {
                return Err(format!(
                    "{} = {}: allowed: a number in [0, 1e200] (an energy, i.e. a variance)",
                    k("tail_energy"),
                    s.tail_energy
                ));
            }
            if s.spectrum.iter().map(|x| x * x).sum::<f64>() + s.tail_energy <= 0.0 {
                return Err(format!("{}: allowed: a spectrum with positive energy", k("spectrum")));
            }
            if !(s.sensitivity.is_finite() && s.sensitivity > 0.0 && s.sensitivity <= MAX_VALUE) {
                return Err(format!(
                    "{} = {}: allowed: a number in (0, {MAX_VALUE:e}]",
                    k("sensitivity"),
                    s.sensitivity
                ));
            }
        }
        Ok(())
    }

    /// The same sites with every singular value σ_k raised to `gamma` (the preset's
    /// `sites.spectrum_exponent`). The energy beyond the listed values keeps its ratio to the
    /// last listed value's energy, since its values are not known one by one.
    pub fn with_spectrum_exponent(mut self, gamma: f64) -> Calibration {
        if gamma == 1.0 {
            return self;
        }
        for s in &mut self.sites {
            if let Some(&last) = s.spectrum.last()
                && last > 0.0
            {
                s.tail_energy *= last.powf(2.0 * gamma) / (last * last);
            }
            s.spectrum.iter_mut().for_each(|x| *x = x.powf(gamma));
        }
        self
    }

    /// The sites described by the file.
    pub fn sites(&self) -> Vec<Site> {
        self.sites
            .iter()
            .map(|s| Site { name: s.name.clone(), d_in: s.d_in, d_out: s.d_out, role: s.role, layer: s.layer })
            .collect()
    }

    /// Writes the file as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("calibration serializes")
    }
}

/// Singular values, descending, of a row-major `rows × cols` matrix (e.g. a site's ΔW = B·A at a
/// high rank, or the QR core of B and Aᵀ), via LAPACK. This is how a real run produces a
/// calibration `spectrum` without libtorch.
pub fn singular_values(data: &[f64], rows: usize, cols: usize) -> Result<Vec<f64>, EnvError> {
    use ndarray_linalg::SVD;
    let bad = |message: String| EnvError::Calibration { file: "<matrix>".into(), message };
    if rows == 0 || cols == 0 || data.len() != rows * cols {
        return Err(bad(format!("matrix data has {} values: allowed: rows × cols = {rows} × {cols} > 0", data.len())));
    }
    if data.iter().any(|x| !x.is_finite()) {
        return Err(bad("matrix: allowed: finite values only".into()));
    }
    let a = ndarray::Array2::from_shape_vec((rows, cols), data.to_vec()).map_err(|e| bad(e.to_string()))?;
    let (_, s, _) = a.svd(false, false).map_err(|e| bad(format!("SVD failed: {e}")))?;
    let mut s = s.to_vec();
    s.sort_by(|x, y| y.total_cmp(x));
    Ok(s)
}

/// The family a loss curve is fitted with (see [`fit_loss_curve`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecayLaw {
    /// L(s) = A + B·r^s: the removable loss shrinks by the same ratio every step.
    Exponential,
    /// L(s) = A + B·(1 + s·c/α)^(−α), c = −ln r: the same first step, then a power law in s
    /// (the exponential is its limit α → ∞).
    Power,
}

/// The least-squares fit of a probe's loss curve (see [`fit_loss_curve`]): L(s) = A + B·r^s, or
/// with an `exponent` α, L(s) = A + B·(1 + s·c/α)^(−α), c = −ln r.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossCurveFit {
    /// A ≥ 0: the loss the curve levels off at (same unit as the losses, e.g. nats/token).
    pub floor: f64,
    /// B > 0: the removable loss, extrapolated to s = 0.
    pub amplitude: f64,
    /// r in (0, 1): the per-step ratio by which the removable loss shrinks (at s = 0 for the
    /// power law, where the ratio rises towards 1 with the steps).
    pub ratio: f64,
    /// The power law's α; `None` for the exponential.
    pub exponent: Option<f64>,
    /// Root mean square of the residuals y_s − L(s) (the step-to-step noise of the batches).
    pub rms: f64,
    /// Number of losses fitted (S).
    pub steps: usize,
}

impl LossCurveFit {
    /// The fitted loss at step `s` (1-based, as in [`fit_loss_curve`]).
    pub fn at(&self, s: f64) -> f64 {
        self.floor + self.amplitude * decay(self.ratio, self.exponent, s)
    }

    /// The fitted removable loss at the first logged step, B·x(1): the first loss is measured on
    /// the first batch before its update, so this is the removable loss before any training.
    pub fn initial_removable(&self) -> f64 {
        self.amplitude * decay(self.ratio, self.exponent, 1.0)
    }
}

/// x(s) = r^s, or (1 + s·c/α)^(−α) with c = −ln r.
fn decay(r: f64, exponent: Option<f64>, s: f64) -> f64 {
    match exponent {
        None => r.powf(s),
        Some(alpha) => (1.0 - s * r.ln() / alpha).powf(-alpha),
    }
}

/// Why [`fit_loss_curve`] found no meaningful fit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NoFit {
    /// Fewer than [`MIN_FIT_STEPS`] losses.
    TooShort {
        /// How many there were.
        steps: usize,
    },
    /// A loss is NaN or infinite.
    NonFinite {
        /// Its step (1-based).
        step: usize,
    },
    /// The curve does not decrease by more than its noise (flat, increasing or pure noise).
    NotDecreasing {
        /// Mean of the first quarter of the losses.
        first: f64,
        /// Mean of the last quarter of the losses.
        last: f64,
    },
}

impl std::fmt::Display for NoFit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoFit::TooShort { steps } => write!(f, "{steps} losses, at least {MIN_FIT_STEPS} are needed"),
            NoFit::NonFinite { step } => write!(f, "the loss at step {step} is not finite"),
            NoFit::NotDecreasing { first, last } => write!(
                f,
                "the loss does not decrease beyond its noise (mean of the first quarter {first:.4}, of the last {last:.4})"
            ),
        }
    }
}

/// Fewest losses [`fit_loss_curve`] fits (three parameters, and a quarter of the curve at each end).
pub const MIN_FIT_STEPS: usize = 8;

/// The spectrum exponent γ (`sites.spectrum_exponent`) under which a calibration's energy tables
/// explain what uniform ranks gain in real runs. `gains` holds (r, L(r) − L(top)): the final loss
/// of real runs at uniform rank r minus that at uniform rank `top`. The simulated counterpart is
/// Σ_l w_l·(E_l(top) − E_l(r)), with w_l the sites' normalised sensitivities and E_l(r) the
/// share of site l's energy in its first r values under γ; one scale (the loss the adapters can
/// remove, in the real loss's unit) is fitted by least squares for each γ of a grid (0.05 to 2 in
/// steps of 0.01), and the γ with the smallest residual wins. Returns (γ, scale, rms residual).
pub fn fit_spectrum_exponent(cal: &Calibration, gains: &[(u32, f64)], top: u32) -> Option<(f64, f64, f64)> {
    if gains.is_empty() || cal.sites.is_empty() {
        return None;
    }
    let ranks: Vec<u32> = gains.iter().map(|&(r, _)| r).collect();
    (5..=200)
        .map(|g| {
            let gamma = g as f64 / 100.0;
            let sim = simulated_gains(cal, gamma, &ranks, top);
            let ss: f64 = sim.iter().map(|x| x * x).sum();
            let scale = if ss > 0.0 { sim.iter().zip(gains).map(|(x, (_, y))| x * y).sum::<f64>() / ss } else { 0.0 };
            let rss: f64 = sim.iter().zip(gains).map(|(x, (_, y))| (scale * x - y).powi(2)).sum();
            (gamma, scale, (rss / gains.len() as f64).sqrt())
        })
        .min_by(|a, b| a.2.total_cmp(&b.2))
}

/// Σ_l w_l·(E_l(top) − E_l(r)) for each r of `ranks` under the spectrum exponent `gamma` (see
/// [`fit_spectrum_exponent`]): the share of the removable loss that uniform rank `top` captures
/// beyond uniform rank r.
pub fn simulated_gains(cal: &Calibration, gamma: f64, ranks: &[u32], top: u32) -> Vec<f64> {
    let cal = cal.clone().with_spectrum_exponent(gamma);
    let w_sum: f64 = cal.sites.iter().map(|s| s.sensitivity).sum::<f64>().max(f64::MIN_POSITIVE);
    ranks
        .iter()
        .map(|&r| {
            cal.sites
                .iter()
                .map(|s| {
                    let total = (s.spectrum.iter().map(|x| x * x).sum::<f64>() + s.tail_energy).max(f64::MIN_POSITIVE);
                    let share = |k: u32| s.spectrum.iter().take(k as usize).map(|x| x * x).sum::<f64>() / total;
                    s.sensitivity / w_sum * (share(top) - share(r))
                })
                .sum()
        })
        .collect()
}

/// Least-squares fit of a probe's training-loss curve, one (noisy) loss per optimizer step
/// s = 1..S (`losses[s − 1]`), to
///
/// L(s) = A + B·r^s, with A ≥ 0, B > 0, 0 < r < 1 ([`DecayLaw::Exponential`]), or
/// L(s) = A + B·(1 + s·c/α)^(−α), c = −ln r, α > 0 ([`DecayLaw::Power`]).
///
/// For a fixed r the model is linear in (A, B), so A and B come from linear least squares in
/// closed form (with A ≥ 0 and B ≥ 0 enforced exactly: the unconstrained solution when it is
/// feasible, otherwise the better of the two boundary solutions A = 0 and B = 0). The residual
/// sum of squares is then a function of r alone. It is searched over the time constant
/// τ = −1/ln r (in steps), on a log grid from 0.1 to 100·S steps and refined by golden-section
/// search between the grid neighbours of the best point. Beyond τ = 100·S the curve is a
/// straight line over the probe and r is no longer identified.
///
/// No fit is meaningful ([`NoFit::NotDecreasing`]) when the mean of the last quarter of the losses
/// is not below the mean of the first quarter by more than two standard errors of the noise (the
/// noise level estimated from successive differences, so a trend does not count as noise), or when
/// the fitted curve itself does not decrease (B = 0). Non-finite losses and curves of fewer than
/// [`MIN_FIT_STEPS`] steps give the other [`NoFit`] reasons. Pure and deterministic; never panics.
///
/// The power law adds an outer search over ln α (a grid from [`MIN_EXPONENT`] to
/// [`MAX_EXPONENT`], refined by golden section), each α with the inner search above; its fit is
/// therefore never worse than the best exponential it can approach (α → ∞) on the grid's range.
pub fn fit_loss_curve(losses: &[f64], law: DecayLaw) -> Result<LossCurveFit, NoFit> {
    let n = losses.len();
    if n < MIN_FIT_STEPS {
        return Err(NoFit::TooShort { steps: n });
    }
    if let Some(i) = losses.iter().position(|y| !y.is_finite()) {
        return Err(NoFit::NonFinite { step: i + 1 });
    }
    // Does it decrease beyond the noise?
    let q = (n / 4).max(1);
    let mean = |ys: &[f64]| ys.iter().sum::<f64>() / ys.len() as f64;
    let (first, last) = (mean(&losses[..q]), mean(&losses[n - q..]));
    let noise_var = losses.windows(2).map(|w| (w[1] - w[0]).powi(2)).sum::<f64>() / (2.0 * (n - 1) as f64);
    let not_decreasing = NoFit::NotDecreasing { first, last };
    let (drop, threshold) = (first - last, 2.0 * (2.0 * noise_var / q as f64).sqrt());
    if drop.is_nan() || threshold.is_nan() || drop <= threshold {
        return Err(not_decreasing);
    }
    let (ln_tau, exponent) = match law {
        DecayLaw::Exponential => (best_ln_tau(losses, None).0, None),
        DecayLaw::Power => {
            let ln_alpha =
                golden_min(MIN_EXPONENT.ln(), MAX_EXPONENT.ln(), 48, |x| best_ln_tau(losses, Some(x.exp())).1);
            (best_ln_tau(losses, Some(ln_alpha.exp())).0, Some(ln_alpha.exp()))
        }
    };
    let r = (-(-ln_tau).exp()).exp();
    let (a, b, sse) = linear_fit(losses, &decay_row(r, exponent, n));
    if !(b > 0.0 && r > 0.0 && r < 1.0 && a.is_finite() && b.is_finite() && sse.is_finite()) {
        return Err(not_decreasing);
    }
    Ok(LossCurveFit { floor: a, amplitude: b, ratio: r, exponent, rms: (sse / n as f64).sqrt(), steps: n })
}

/// Smallest power-law exponent [`fit_loss_curve`] searches.
pub const MIN_EXPONENT: f64 = 0.02;
/// Largest power-law exponent [`fit_loss_curve`] searches (beyond it the curve is an exponential
/// over any probe).
pub const MAX_EXPONENT: f64 = 1e3;

/// x_s = [`decay`](r, exponent, s) for s = 1..n; the exponential by repeated products.
fn decay_row(r: f64, exponent: Option<f64>, n: usize) -> Vec<f64> {
    match exponent {
        None => {
            let mut x = Vec::with_capacity(n);
            let mut p = r;
            for _ in 0..n {
                x.push(p);
                p *= r;
            }
            x
        }
        Some(_) => (1..=n).map(|s| decay(r, exponent, s as f64)).collect(),
    }
}

/// For a fixed law: the time constant ln τ (τ = −1/ln r, in steps) of the least-squares fit and
/// its residual sum of squares, searched on a log grid from 0.1 to 100·S steps and refined by
/// golden section between the grid neighbours of the best point. Beyond τ = 100·S the curve is a
/// straight line over the probe and r is no longer identified.
fn best_ln_tau(losses: &[f64], exponent: Option<f64>) -> (f64, f64) {
    let n = losses.len();
    let sse_at = |ln_tau: f64| linear_fit(losses, &decay_row((-(-ln_tau).exp()).exp(), exponent, n)).2;
    let ln_tau = golden_min(0.1f64.ln(), (100.0 * n as f64).ln(), 240, sse_at);
    (ln_tau, sse_at(ln_tau))
}

/// The minimum of `f` on [lo, hi]: a grid of `grid` intervals, then golden section between the
/// neighbours of the best grid point (80 iterations), unless a grid point was better (golden
/// section assumes one minimum).
fn golden_min(lo: f64, hi: f64, grid: usize, f: impl Fn(f64) -> f64) -> f64 {
    let at = |k: usize| lo + (hi - lo) * k as f64 / grid as f64;
    let best_k = (0..=grid).map(|k| (k, f(at(k)))).min_by(|x, y| x.1.total_cmp(&y.1)).map(|(k, _)| k).unwrap_or(0);
    let (mut x0, mut x3) = (at(best_k.saturating_sub(1)), at((best_k + 1).min(grid)));
    let g = (5f64.sqrt() - 1.0) / 2.0;
    let (mut x1, mut x2) = (x3 - g * (x3 - x0), x0 + g * (x3 - x0));
    let (mut f1, mut f2) = (f(x1), f(x2));
    for _ in 0..80 {
        if f1 <= f2 {
            x3 = x2;
            x2 = x1;
            f2 = f1;
            x1 = x3 - g * (x3 - x0);
            f1 = f(x1);
        } else {
            x0 = x1;
            x1 = x2;
            f1 = f2;
            x2 = x0 + g * (x3 - x0);
            f2 = f(x2);
        }
    }
    [(x1, f1), (x2, f2), (at(best_k), f(at(best_k)))]
        .into_iter()
        .min_by(|x, y| x.1.total_cmp(&y.1))
        .map(|(x, _)| x)
        .unwrap_or(x1)
}

/// For fixed x_s: the least-squares (A, B) with A ≥ 0, B ≥ 0 of y_s ≈ A + B·x_s, and the
/// residual sum of squares.
fn linear_fit(y: &[f64], x: &[f64]) -> (f64, f64, f64) {
    let n = y.len() as f64;
    let sse = |a: f64, b: f64| x.iter().zip(y).map(|(xi, yi)| (yi - a - b * xi).powi(2)).sum::<f64>();
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let sxx: f64 = x.iter().map(|xi| (xi - mx).powi(2)).sum();
    let sxy: f64 = x.iter().zip(y).map(|(xi, yi)| (xi - mx) * (yi - my)).sum();
    let mut cands = Vec::with_capacity(3);
    if sxx > 0.0 {
        let b = sxy / sxx;
        let a = my - b * mx;
        if a >= 0.0 && b >= 0.0 {
            cands.push((a, b));
        }
    }
    // Boundaries: A = 0 (B by least squares through the origin) and B = 0 (A = mean).
    let xx: f64 = x.iter().map(|xi| xi * xi).sum();
    let xy: f64 = x.iter().zip(y).map(|(xi, yi)| xi * yi).sum();
    cands.push((0.0, if xx > 0.0 { (xy / xx).max(0.0) } else { 0.0 }));
    cands.push((my.max(0.0), 0.0));
    // `cands` always holds the two boundary solutions; the fallback is never taken.
    let fallback = (my, 0.0, f64::INFINITY);
    cands.into_iter().map(|(a, b)| (a, b, sse(a, b))).min_by(|u, v| u.2.total_cmp(&v.2)).unwrap_or(fallback)
}

/// Smallest per-round learning rate [`fitted_dynamics`] writes (`dynamics.learning_rate` must be
/// > 0).
pub const MIN_LEARNING_RATE: f64 = 1e-6;

/// The simulator's dynamics derived from a probe's [`LossCurveFit`] by [`fitted_dynamics`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FittedDynamics {
    /// η = 1 − r^steps_per_round (the power law's first round: see [`fitted_dynamics`]), clamped
    /// to [[`MIN_LEARNING_RATE`], 1].
    pub learning_rate: f64,
    /// The power law's α (the fit's; unit-free, so the same per step and per round); `None` for
    /// the exponential.
    pub decay_exponent: Option<f64>,
    /// L∞ = sensitivity.total · A / (B·r), clamped to what the preset allows.
    pub loss_floor: f64,
    /// η before the clamp.
    pub raw_learning_rate: f64,
    /// L∞ before the clamp.
    pub raw_loss_floor: f64,
    /// Optimizer steps per simulated round the mapping used.
    pub steps_per_round: u32,
}

impl FittedDynamics {
    /// Whether η was clamped.
    pub fn learning_rate_clamped(&self) -> bool {
        self.learning_rate != self.raw_learning_rate
    }

    /// Whether L∞ was clamped.
    pub fn loss_floor_clamped(&self) -> bool {
        self.loss_floor != self.raw_loss_floor
    }

    /// Writes η, the law and L∞ into `d`; every other key (the entropy effect, the data proxies)
    /// keeps its value.
    pub fn apply(&self, d: &mut crate::presets::DynamicsConfig) {
        d.learning_rate = self.learning_rate;
        d.decay_exponent = self.decay_exponent;
        d.loss_floor = self.loss_floor;
    }
}

/// The simulator's per-round learning rate η and loss floor L∞ from the fit of a probe's loss
/// curve (see [`fit_loss_curve`]), for a real run of `steps_per_round` optimizer steps per
/// scheduler round (a real run's `--steps / --rounds`: the controller splits the steps evenly over
/// the rounds, `RunOptions::even`; 0 is read as 1).
///
/// # The mapping
///
/// The probe trains every site at its (high) probe rank, where the calibrated energy table gives
/// E(r) = 1 (the spectra are measured at that rank), so in the simulator its loss after t rounds is
/// L∞ + T·(1 − η)^t, with T = `sensitivity.total` (the loss above the floor at the start of an
/// episode: Σ_l w_l, the calibrated sensitivities are rescaled to it) and L∞ = `loss_floor`. The
/// probe's loss after k updates is L(k + 1) = A + B·r·r^k (the loss of step s is measured before
/// that step's update). Equating the two at k = t·steps_per_round:
///
/// - η = 1 − r^steps_per_round: the share of the removable loss one round of updates removes;
/// - L∞ = T · A / (B·r): the floor in the simulator's unit, in which the removable loss at the
///   start is T. The simulator's loss is the real loss times T / (B·r), so its `loss_ratio`
///   (loss / initial loss, the feature a policy reads) follows the real run's: it starts at 1 and
///   levels off at A / (A + B·r) in both.
///
/// T keeps the template's value: it is the unit of the reward, which the cost, violation and
/// perturbation coefficients are relative to.
///
/// For the power law the removable loss after k rounds is B·x(kK + 1) with x(s) = (1 + s·c/α)^(−α),
/// and x(kK + 1)/x(1) = (1 + k·K·c/(α + c))^(−α): the simulator's law (1 + k·c_r/α)^(−α)
/// ([`crate::presets::DynamicsConfig::round_rate`]) with the same α and c_r = K·c·α/(α + c), so
/// η = 1 − e^(−c_r), which tends to 1 − r^K as α → ∞.
///
/// # Clamps
///
/// η is kept in [[`MIN_LEARNING_RATE`], 1] (the preset allows (0, 1]). L∞ is kept in [0, 1e6] and
/// below `violation_coef − T` (the preset requires `loss_floor + sensitivity.total <
/// violation_coef`, so that every feasible round beats a violation; with `violation_coef ≤ T`
/// no floor fits and L∞ is 0). The values before the clamps are kept in the result.
///
/// # Not fitted
///
/// `entropy_effect` (η_t = η·(1 − entropy_effect·(entropy_t − entropy_mean))) is the response of
/// the learning rate to the batches' token entropy. One probe curve of one data stream at one
/// mean entropy cannot identify it (its deviations average out in the fitted η, which is the mean
/// per-round rate), so it and the data proxies' statistics keep the template's values.
pub fn fitted_dynamics(
    fit: &LossCurveFit,
    steps_per_round: u32,
    sensitivity_total: f64,
    violation_coef: f64,
) -> FittedDynamics {
    let k = steps_per_round.max(1);
    let raw_eta = match fit.exponent {
        None => 1.0 - fit.ratio.powf(k as f64),
        Some(alpha) => {
            let c = -fit.ratio.ln();
            1.0 - (-(k as f64) * c * alpha / (alpha + c)).exp()
        }
    };
    let learning_rate = if raw_eta.is_finite() { raw_eta.clamp(MIN_LEARNING_RATE, 1.0) } else { 1.0 };
    let raw_floor = sensitivity_total * fit.floor / fit.initial_removable();
    // The preset's strict `loss_floor + total < violation_coef`, with room for rounding.
    let cap = ((violation_coef - sensitivity_total) * (1.0 - 1e-9)).min(1e6);
    let loss_floor = if raw_floor.is_finite() { raw_floor.clamp(0.0, cap.max(0.0)) } else { cap.max(0.0) };
    FittedDynamics {
        learning_rate,
        decay_exponent: fit.exponent,
        loss_floor,
        raw_learning_rate: raw_eta,
        raw_loss_floor: raw_floor,
        steps_per_round: k,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn singular_values_of_a_low_rank_product() {
        // B (4×2) · A (2×3) with orthogonal columns/rows scaled 3 and 1: singular values 3, 1, 0.
        let b = [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]];
        let a = [[3.0, 0.0, 0.0], [0.0, 1.0, 0.0]];
        let mut m = vec![0.0; 12];
        for i in 0..4 {
            for j in 0..3 {
                m[i * 3 + j] = (0..2).map(|k| b[i][k] * a[k][j]).sum();
            }
        }
        let s = singular_values(&m, 4, 3).unwrap();
        assert_eq!(s.len(), 3);
        assert!((s[0] - 3.0).abs() < 1e-12 && (s[1] - 1.0).abs() < 1e-12 && s[2].abs() < 1e-12, "{s:?}");
        assert!(singular_values(&m, 3, 3).is_err());
        assert!(singular_values(&[f64::NAN], 1, 1).is_err());
    }

    fn power_law_calibration(decays: &[f64]) -> Calibration {
        Calibration {
            format_version: FORMAT_VERSION,
            model: "test".into(),
            sites: decays
                .iter()
                .enumerate()
                .map(|(l, &b)| CalibratedSite {
                    name: format!("s{l}"),
                    d_in: 64,
                    d_out: 64,
                    role: Role::Other,
                    layer: l as u32,
                    spectrum: (1..=32).map(|k| (k as f64).powf(-b)).collect(),
                    tail_energy: 0.5 * 32f64.powf(-2.0 * b),
                    sensitivity: 1.0 + l as f64,
                })
                .collect(),
        }
    }

    #[test]
    fn the_spectrum_exponent_flattens_the_spectra_and_is_recovered_from_what_ranks_gain() {
        let cal = power_law_calibration(&[0.8, 1.2, 1.6]);
        assert_eq!(cal.clone().with_spectrum_exponent(1.0), cal);
        let flat = cal.clone().with_spectrum_exponent(0.5);
        let (s, f) = (&cal.sites[1], &flat.sites[1]);
        assert!((f.spectrum[3] - s.spectrum[3].sqrt()).abs() < 1e-15);
        // The tail keeps its ratio to the last listed value's energy.
        let ratio = |x: &CalibratedSite| x.tail_energy / x.spectrum[31].powi(2);
        assert!((ratio(f) - ratio(s)).abs() < 1e-12 * ratio(s));
        // Flatter spectra: rank 16 gains more over rank 8 than before.
        let gain = |c: &Calibration| simulated_gains(c, 1.0, &[8], 32)[0];
        assert!(gain(&flat) > 2.0 * gain(&cal), "{} vs {}", gain(&flat), gain(&cal));
        // Gains made at γ = 0.6 with a scale of 0.3 (and a little noise) give back both.
        let ranks = [1u32, 2, 4, 8, 16];
        let sim = simulated_gains(&cal, 0.6, &ranks, 32);
        let gains: Vec<(u32, f64)> =
            ranks.iter().zip(&sim).zip(noise(5, 1e-4, 7)).map(|((&r, x), e)| (r, 0.3 * x + e)).collect();
        let (gamma, scale, rms) = fit_spectrum_exponent(&cal, &gains, 32).unwrap();
        assert!((gamma - 0.6).abs() <= 0.011 && (scale - 0.3).abs() < 0.01 && rms < 1e-3, "{gamma} {scale} {rms}");
        assert_eq!(fit_spectrum_exponent(&cal, &[], 32), None);
    }

    /// Deterministic noise, uniform in [−amp, amp] (a 64-bit LCG).
    fn noise(n: usize, amp: f64, seed: u64) -> Vec<f64> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                amp * (2.0 * ((x >> 11) as f64 / (1u64 << 53) as f64) - 1.0)
            })
            .collect()
    }

    fn curve(a: f64, b: f64, r: f64, n: usize) -> Vec<f64> {
        (1..=n).map(|s| a + b * r.powi(s as i32)).collect()
    }

    #[test]
    fn loss_curve_fit_recovers_a_known_curve() {
        // Exact data: recovered to the search's precision.
        let f = fit_loss_curve(&curve(2.1, 1.2, 0.96, 100), DecayLaw::Exponential).unwrap();
        assert!((f.floor - 2.1).abs() < 1e-6 && (f.amplitude - 1.2).abs() < 1e-6, "{f:?}");
        assert!((f.ratio - 0.96).abs() < 1e-8 && f.rms < 1e-6 && f.steps == 100, "{f:?}");
        // With noise of about the probe's size (uniform ±0.05, std 0.029, against a drop of 1.2):
        // A within 0.03, B within 0.06, r within 0.004 and the residual RMS within 20 % of the
        // noise's standard deviation.
        let amp = 0.05;
        for seed in [1, 2, 3] {
            let y: Vec<f64> =
                curve(2.1, 1.2, 0.96, 100).iter().zip(noise(100, amp, seed)).map(|(c, e)| c + e).collect();
            let f = fit_loss_curve(&y, DecayLaw::Exponential).unwrap();
            assert!((f.floor - 2.1).abs() < 0.03, "seed {seed}: {f:?}");
            assert!((f.amplitude - 1.2).abs() < 0.06, "seed {seed}: {f:?}");
            assert!((f.ratio - 0.96).abs() < 0.004, "seed {seed}: {f:?}");
            let sd = amp / 3f64.sqrt();
            assert!((f.rms / sd - 1.0).abs() < 0.2, "seed {seed}: rms {} against {sd}", f.rms);
            assert!((f.at(1.0) - (2.1 + 1.2 * 0.96)).abs() < 0.03);
        }
        // A curve still far from its floor after the probe (r^S = 0.37) and one that has converged
        // within a few steps.
        let f = fit_loss_curve(&curve(1.5, 2.0, 0.99, 100), DecayLaw::Exponential).unwrap();
        assert!((f.floor - 1.5).abs() < 1e-5 && (f.ratio - 0.99).abs() < 1e-8, "{f:?}");
        let f = fit_loss_curve(&curve(1.5, 2.0, 0.5, 60), DecayLaw::Exponential).unwrap();
        assert!((f.floor - 1.5).abs() < 1e-6 && (f.ratio - 0.5).abs() < 1e-6, "{f:?}");
    }

    fn power_curve(a: f64, b: f64, r: f64, alpha: f64, n: usize) -> Vec<f64> {
        (1..=n).map(|s| a + b * decay(r, Some(alpha), s as f64)).collect()
    }

    #[test]
    fn power_law_fit_recovers_a_known_curve_and_extrapolates_it() {
        // Exact data: recovered to the search's precision.
        let f = fit_loss_curve(&power_curve(1.8, 1.5, 0.9, 0.6, 100), DecayLaw::Power).unwrap();
        let alpha = f.exponent.unwrap();
        assert!((f.floor - 1.8).abs() < 1e-4 && (f.amplitude - 1.5).abs() < 1e-4, "{f:?}");
        assert!((f.ratio - 0.9).abs() < 1e-5 && (alpha - 0.6).abs() < 1e-3 && f.rms < 1e-6, "{f:?}");
        // With the probe's noise, fitted on the first 100 steps: the extrapolation to step 200 (a
        // real run's length) stays within 0.03 of the truth, where the exponential's misses by
        // more, because it levels off early.
        for seed in [1, 2, 3] {
            let truth = power_curve(1.8, 1.5, 0.9, 0.6, 200);
            let y: Vec<f64> = truth[..100].iter().zip(noise(100, 0.05, seed)).map(|(c, e)| c + e).collect();
            let p = fit_loss_curve(&y, DecayLaw::Power).unwrap();
            let e = fit_loss_curve(&y, DecayLaw::Exponential).unwrap();
            assert!((p.at(200.0) - truth[199]).abs() < 0.03, "seed {seed}: {p:?}");
            assert!((e.at(200.0) - truth[199]).abs() > 0.05, "seed {seed}: {e:?}");
            assert!(p.rms <= e.rms + 1e-12, "seed {seed}");
        }
        // On an exponential curve the power law goes to a large exponent and fits as well.
        let y = curve(2.1, 1.2, 0.96, 100);
        let f = fit_loss_curve(&y, DecayLaw::Power).unwrap();
        assert!(f.exponent.unwrap() > 50.0 && f.rms < 1e-3, "{f:?}");
    }

    #[test]
    fn fitted_power_dynamics_match_the_probe_round_by_round() {
        // The simulator's loss after t rounds at the probe's ranks, L∞ + T·Π(1 − η_k), is the
        // probe's fitted loss after 10·t updates times T/(B·x(1)).
        let fit = LossCurveFit { floor: 2.0, amplitude: 1.5, ratio: 0.95, exponent: Some(0.4), rms: 0.0, steps: 100 };
        let d = fitted_dynamics(&fit, 10, 1.0, 10.0);
        assert_eq!(d.decay_exponent, Some(0.4));
        let mut p = crate::presets::load("wireless-rayleigh").unwrap();
        d.apply(&mut p.dynamics);
        assert_eq!(p.dynamics.decay_exponent, Some(0.4));
        let mut gap = 1.0;
        for t in 0..20 {
            let sim = d.loss_floor + gap;
            let real = fit.at((10 * t + 1) as f64);
            assert!(
                (sim - real / fit.initial_removable()).abs() < 1e-9,
                "round {t}: {sim} vs {}",
                real / fit.initial_removable()
            );
            gap *= 1.0 - p.dynamics.round_rate(t as f64);
        }
    }

    #[test]
    fn loss_curve_fit_refuses_curves_that_do_not_decrease() {
        let flat = vec![2.0; 100];
        assert!(matches!(fit_loss_curve(&flat, DecayLaw::Exponential), Err(NoFit::NotDecreasing { .. })));
        let noisy_flat: Vec<f64> = noise(100, 0.05, 7).iter().map(|e| 2.0 + e).collect();
        assert!(matches!(fit_loss_curve(&noisy_flat, DecayLaw::Exponential), Err(NoFit::NotDecreasing { .. })));
        let increasing: Vec<f64> = (1..=100).map(|s| 2.0 + 0.01 * s as f64).collect();
        assert!(matches!(fit_loss_curve(&increasing, DecayLaw::Exponential), Err(NoFit::NotDecreasing { .. })));
        let rising_to_a_ceiling = curve(3.0, -1.0, 0.95, 100);
        assert!(matches!(
            fit_loss_curve(&rising_to_a_ceiling, DecayLaw::Exponential),
            Err(NoFit::NotDecreasing { .. })
        ));
        assert_eq!(fit_loss_curve(&[3.0, 2.0, 1.0], DecayLaw::Exponential), Err(NoFit::TooShort { steps: 3 }));
        assert_eq!(fit_loss_curve(&[], DecayLaw::Exponential), Err(NoFit::TooShort { steps: 0 }));
        let mut y = curve(2.0, 1.0, 0.9, 20);
        y[4] = f64::NAN;
        assert_eq!(fit_loss_curve(&y, DecayLaw::Exponential), Err(NoFit::NonFinite { step: 5 }));
        y[4] = f64::INFINITY;
        assert_eq!(fit_loss_curve(&y, DecayLaw::Exponential), Err(NoFit::NonFinite { step: 5 }));
        // Every reason reads as one line.
        for e in
            [NoFit::TooShort { steps: 3 }, NoFit::NonFinite { step: 5 }, NoFit::NotDecreasing { first: 2.0, last: 2.0 }]
        {
            assert!(!e.to_string().contains('\n'));
        }
    }

    #[test]
    fn fitted_dynamics_by_hand() {
        let fit = LossCurveFit { floor: 2.0, amplitude: 1.0, ratio: 0.9, exponent: None, rms: 0.0, steps: 100 };
        // 10 steps per round: η = 1 − 0.9^10 = 1 − 0.3486784401 = 0.6513215599; with T = 1 the
        // floor is T·A/(B·r) = 2/0.9 = 2.2222….
        let d = fitted_dynamics(&fit, 10, 1.0, 10.0);
        assert!((d.learning_rate - 0.6513215599).abs() < 1e-12, "{d:?}");
        assert!((d.loss_floor - 2.0 / 0.9).abs() < 1e-12, "{d:?}");
        assert!(!d.learning_rate_clamped() && !d.loss_floor_clamped() && d.steps_per_round == 10);
        // T = 0.5 halves the floor; one step per round gives η = 1 − r = 0.1 (0 is read as 1).
        let d = fitted_dynamics(&fit, 0, 0.5, 10.0);
        assert!((d.learning_rate - 0.1).abs() < 1e-12 && (d.loss_floor - 1.0 / 0.9).abs() < 1e-12, "{d:?}");
        assert_eq!(d.steps_per_round, 1);
        // A violation coefficient of 3 leaves room for a floor below 3 − T = 2 only: clamped.
        let d = fitted_dynamics(&fit, 10, 1.0, 3.0);
        assert!(d.loss_floor_clamped() && d.loss_floor < 2.0 && d.loss_floor > 2.0 - 1e-6, "{d:?}");
        assert!((d.raw_loss_floor - 2.0 / 0.9).abs() < 1e-12);
        // The simulator's loss at all probe ranks after t rounds, L∞ + T·(1 − η)^t, is the probe's
        // loss after 10·t updates times T/(B·r).
        let d = fitted_dynamics(&fit, 10, 1.0, 10.0);
        for t in 0..5 {
            let sim = d.loss_floor + (1.0 - d.learning_rate).powi(t);
            let real = fit.at((10 * t + 1) as f64);
            assert!((sim - real / fit.initial_removable()).abs() < 1e-12, "round {t}");
        }
        // Writing into a preset keeps the entropy effect.
        let mut p = crate::presets::load("wireless-rayleigh").unwrap();
        let before = p.dynamics.clone();
        d.apply(&mut p.dynamics);
        assert_eq!(p.dynamics.learning_rate, d.learning_rate);
        assert_eq!(p.dynamics.loss_floor, d.loss_floor);
        assert_eq!(p.dynamics.entropy_effect, before.entropy_effect);
        assert_eq!(p.dynamics.data_rho, before.data_rho);
        // And the clamped values pass the preset's validation.
        use rankpilot_config::Validate;
        for (total, coef) in [(1.0, 10.0), (1.0, 3.0), (1.0, 1.0 + 2.0 / 0.9)] {
            let mut v = rankpilot_config::Violations::default();
            p.sensitivity.total = total;
            p.reward.violation_coef = coef;
            fitted_dynamics(&fit, 10, total, coef).apply(&mut p.dynamics);
            p.validate(&mut v);
            assert!(v.is_empty(), "total {total}, violation_coef {coef}: {:?}", v.into_vec());
        }
    }
}
