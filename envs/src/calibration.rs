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
}
