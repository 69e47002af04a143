//! The log-normal noise on the simulator's per-site signals (sensitivity, gradient norm, tail
//! share), tabulated at normal quantiles.
//!
//! The stepper's hot loop draws three noise factors per site-step. Tabulated, a factor is one
//! 10-bit slice of a random word and one table load instead of a Gaussian sample and an `exp`,
//! and all three come from a single 64-bit word, so every site-step draws exactly one word from
//! the environment's stream whatever the policy does (common random numbers).

use rand::RngCore;

use crate::presets::ObservationConfig;

/// Quantile levels per table; a power of two, so a level is a bit slice of a random word.
const LEVELS: usize = 1024;
/// Bits of a random word that pick one level.
const LEVEL_BITS: u32 = LEVELS.trailing_zeros();
/// Mask of one level's bits.
const LEVEL_MASK: u64 = LEVELS as u64 - 1;

/// Log-normal noise multipliers exp(σ·z_i) at the normal quantiles z_i = Φ⁻¹((i + ½)/1024), one
/// table per noisy site feature (sensitivity, gradient norm, tail share), each with its σ from
/// the preset's `[observation]` section. The three tables are one allocation, so the hot loop
/// reaches all of them from one base register.
#[derive(Debug, Clone)]
pub(crate) struct ObservationNoise {
    tables: Box<[[f32; LEVELS]; 3]>,
}

/// One site-step's noise multipliers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NoiseFactors {
    /// On the sensitivity feature.
    pub(crate) sensitivity: f32,
    /// On the gradient-norm feature.
    pub(crate) grad_norm: f32,
    /// On the tail-share feature.
    pub(crate) tail_share: f32,
}

impl ObservationNoise {
    /// The tables for the preset's noise levels.
    pub(crate) fn new(cfg: &ObservationConfig) -> Self {
        let mut tables = Box::new([[0.0f32; LEVELS]; 3]);
        for (table, sigma) in tables.iter_mut().zip([cfg.sensitivity_noise, cfg.grad_noise, cfg.tail_noise]) {
            for (i, factor) in table.iter_mut().enumerate() {
                *factor = (sigma * normal_quantile((i as f64 + 0.5) / LEVELS as f64)).exp() as f32;
            }
        }
        Self { tables }
    }

    /// Draws the three factors of one site-step from one 64-bit word of `rng`.
    #[inline]
    pub(crate) fn draw(&self, rng: &mut impl RngCore) -> NoiseFactors {
        let bits = rng.next_u64();
        let [sensitivity, grad_norm, tail_share] = &*self.tables;
        // Masked indices are below LEVELS, so these loads need no bounds check.
        NoiseFactors {
            sensitivity: sensitivity[(bits & LEVEL_MASK) as usize],
            grad_norm: grad_norm[((bits >> LEVEL_BITS) & LEVEL_MASK) as usize],
            tail_share: tail_share[((bits >> (2 * LEVEL_BITS)) & LEVEL_MASK) as usize],
        }
    }
}

/// Φ⁻¹(p), the standard normal quantile (Acklam's rational approximation, relative error
/// below 1.2e-9).
#[allow(clippy::excessive_precision)]
fn normal_quantile(p: f64) -> f64 {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_quantile_is_accurate() {
        assert!(normal_quantile(0.5).abs() < 1e-12);
        assert!((normal_quantile(0.975) - 1.959963984540054).abs() < 1e-8);
        assert!((normal_quantile(0.001) + 3.090232306167813).abs() < 1e-7);
    }
}
