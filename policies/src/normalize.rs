//! Running observation normalization (as in CleanRL's `NormalizeObservation`, then clip ±10).
//!
//! Statistics are kept per feature with the parallel mean/variance update (Chan et al.), in f64.
//! Per-site features share one set of statistics across sites, so a policy trained with 28 sites
//! normalizes a 224-site model's features the same way. The statistics are part of the policy:
//! they are saved in checkpoints ([`RunningMeanStd::to_json`]) and frozen at evaluation time.

use crate::PolicyError;
use serde::{Deserialize, Serialize};

/// Normalized features are clipped to ±`CLIP`.
pub const CLIP: f32 = 10.0;
const EPS: f64 = 1e-8;

/// Per-feature running mean and variance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunningMeanStd {
    /// Mean per feature.
    pub mean: Vec<f64>,
    /// Population variance per feature.
    pub var: Vec<f64>,
    /// Number of rows seen (starts at a tiny epsilon, as in Gym, so the first update dominates).
    pub count: f64,
}

impl RunningMeanStd {
    /// Statistics for `dim` features: mean 0, variance 1.
    pub fn new(dim: usize) -> Self {
        RunningMeanStd { mean: vec![0.0; dim], var: vec![1.0; dim], count: 1e-4 }
    }

    /// Number of features.
    pub fn dim(&self) -> usize {
        self.mean.len()
    }

    /// Folds a batch of rows (row-major, `dim` columns) into the statistics.
    pub fn update(&mut self, rows: &[f32]) {
        let d = self.dim();
        if d == 0 || rows.is_empty() {
            return;
        }
        let n = (rows.len() / d) as f64;
        let mut bmean = vec![0.0f64; d];
        for row in rows.chunks_exact(d) {
            for (m, &x) in bmean.iter_mut().zip(row) {
                *m += x as f64;
            }
        }
        bmean.iter_mut().for_each(|m| *m /= n);
        let mut bvar = vec![0.0f64; d];
        for row in rows.chunks_exact(d) {
            for ((v, &x), m) in bvar.iter_mut().zip(row).zip(&bmean) {
                *v += (x as f64 - m).powi(2);
            }
        }
        bvar.iter_mut().for_each(|v| *v /= n);
        let total = self.count + n;
        for j in 0..d {
            let delta = bmean[j] - self.mean[j];
            let m2 = self.var[j] * self.count + bvar[j] * n + delta * delta * self.count * n / total;
            self.mean[j] += delta * n / total;
            self.var[j] = m2 / total;
        }
        self.count = total;
    }

    /// Normalizes rows in place: (x − mean)/sqrt(var + ε), clipped to ±[`CLIP`].
    pub fn normalize(&self, rows: &mut [f32]) {
        let d = self.dim();
        if d == 0 {
            return;
        }
        let scale: Vec<f64> = self.var.iter().map(|v| 1.0 / (v + EPS).sqrt()).collect();
        for row in rows.chunks_exact_mut(d) {
            for j in 0..d {
                row[j] = (((row[j] as f64 - self.mean[j]) * scale[j]) as f32).clamp(-CLIP, CLIP);
            }
        }
    }
}

/// The normalizer of a policy's whole observation: global features and per-site features.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObsNormalizer {
    /// Statistics of the global features.
    pub global: RunningMeanStd,
    /// Statistics of the per-site features (pooled over sites).
    pub site: RunningMeanStd,
}

impl ObsNormalizer {
    /// Fresh statistics for the given feature counts.
    pub fn new(global_dim: usize, site_dim: usize) -> Self {
        ObsNormalizer { global: RunningMeanStd::new(global_dim), site: RunningMeanStd::new(site_dim) }
    }

    /// Serializes the statistics for a checkpoint.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("normalizer serializes")
    }

    /// Restores statistics from a checkpoint, checking the feature counts.
    pub fn from_json(v: &serde_json::Value, global_dim: usize, site_dim: usize) -> Result<Self, PolicyError> {
        let n: ObsNormalizer = serde_json::from_value(v.clone())
            .map_err(|e| PolicyError::Checkpoint(format!("observation normalizer: {e}")))?;
        for (what, r) in [("global", &n.global), ("site", &n.site)] {
            let ok = r.var.len() == r.mean.len()
                && r.mean.iter().all(|m| m.is_finite())
                && r.var.iter().all(|v| v.is_finite() && *v >= 0.0)
                && r.count.is_finite()
                && r.count > 0.0;
            if !ok {
                return Err(PolicyError::Checkpoint(format!(
                    "key `state.normalizer.{what}`: allowed: as many variances as means, finite means, finite variances >= 0 and a finite count > 0"
                )));
            }
        }
        if n.global.dim() != global_dim || n.site.dim() != site_dim {
            return Err(PolicyError::Checkpoint(format!(
                "observation normalizer has {}+{} features, the observation schema has {global_dim}+{site_dim}",
                n.global.dim(),
                n.site.dim()
            )));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_batch_statistics() {
        let mut r = RunningMeanStd::new(2);
        let rows: Vec<f32> = (0..1000).flat_map(|i| [i as f32, (i % 7) as f32 * 2.0]).collect();
        for chunk in rows.chunks(2 * 37) {
            r.update(chunk);
        }
        let xs: Vec<f64> = (0..1000).map(|i| i as f64).collect();
        let mean = xs.iter().sum::<f64>() / 1000.0;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 1000.0;
        assert!((r.mean[0] - mean).abs() < 1e-3, "{} vs {mean}", r.mean[0]);
        assert!((r.var[0] - var).abs() / var < 1e-3, "{} vs {var}", r.var[0]);
        let mut row = [mean as f32, 1e9];
        r.normalize(&mut row);
        assert!(row[0].abs() < 1e-3);
        assert_eq!(row[1], CLIP);
    }

    #[test]
    fn json_round_trip_and_schema_check() {
        let mut n = ObsNormalizer::new(3, 5);
        n.global.update(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        n.site.update(&[0.5; 10]);
        let j = n.to_json();
        let back = ObsNormalizer::from_json(&j, 3, 5).unwrap();
        assert_eq!(back, n);
        let e = ObsNormalizer::from_json(&j, 3, 6).unwrap_err().to_string();
        assert!(e.contains("3+5") && e.contains("3+6"), "{e}");
    }
}
