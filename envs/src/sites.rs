//! Sites (adapted projections), rank sets and the spectral energy tables derived from the
//! hidden update spectra.

use serde::{Deserialize, Serialize};

use crate::EnvError;

/// What kind of projection a site is. The kind is known to a real run (it is in the module
/// name), so policies may use it; in the simulator the hidden spectral decay is correlated with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Attention query projection.
    Q,
    /// Attention key projection.
    K,
    /// Attention value projection.
    V,
    /// Attention output projection.
    O,
    /// MLP gate projection.
    Gate,
    /// MLP up projection.
    Up,
    /// MLP down projection.
    Down,
    /// Anything else.
    Other,
}

impl Role {
    /// All roles, in the order used by per-role tables.
    pub const ALL: [Role; 8] = [Role::Q, Role::K, Role::V, Role::O, Role::Gate, Role::Up, Role::Down, Role::Other];

    /// Index into [`Role::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Lower-case name as used in presets and calibration files.
    pub fn name(self) -> &'static str {
        match self {
            Role::Q => "q",
            Role::K => "k",
            Role::V => "v",
            Role::O => "o",
            Role::Gate => "gate",
            Role::Up => "up",
            Role::Down => "down",
            Role::Other => "other",
        }
    }
}

/// One adapted projection: a LoRA adapter of rank r on it has r·(d_in + d_out) parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Site {
    /// Module name, e.g. `layers.3.v_proj`.
    pub name: String,
    /// Input dimension of the projection.
    pub d_in: u32,
    /// Output dimension of the projection.
    pub d_out: u32,
    /// Projection kind.
    pub role: Role,
    /// Layer index (0-based).
    pub layer: u32,
}

impl Site {
    /// Parameters per unit of rank: d_in + d_out.
    pub fn params_per_rank(&self) -> u64 {
        u64::from(self.d_in) + u64::from(self.d_out)
    }

    /// The largest meaningful rank, min(d_in, d_out).
    pub fn max_rank(&self) -> u32 {
        self.d_in.min(self.d_out)
    }
}

/// The sites of a 32-layer-style Llama decoder: q, k, v, o (hidden→hidden), gate, up
/// (hidden→intermediate), down (intermediate→hidden) per layer, in that order.
pub fn llama_sites(layers: u32, hidden: u32, intermediate: u32, projections: &[Role]) -> Vec<Site> {
    let mut out = Vec::with_capacity(layers as usize * projections.len());
    for layer in 0..layers {
        for &role in projections {
            let (d_in, d_out) = match role {
                Role::Gate | Role::Up => (hidden, intermediate),
                Role::Down => (intermediate, hidden),
                _ => (hidden, hidden),
            };
            let module = match role {
                Role::Q | Role::K | Role::V | Role::O => format!("self_attn.{}_proj", role.name()),
                Role::Other => "other".to_string(),
                _ => format!("mlp.{}_proj", role.name()),
            };
            out.push(Site { name: format!("layers.{layer}.{module}"), d_in, d_out, role, layer });
        }
    }
    out
}

/// The allowed LoRA ranks, sorted ascending without duplicates (e.g. {0, 1, 2, 4, …, 64}).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankSet {
    ranks: Vec<u32>,
    /// `index_of[r]` = position of rank r in `ranks`, or `u8::MAX` when r is not in the set.
    /// A table rather than a search so that validating actions costs one load per site.
    index_of: Vec<u8>,
}

impl RankSet {
    /// Builds a rank set; errors on an empty list, duplicates, more than 255 entries, or ranks
    /// above `max_allowed` (the smallest min(d_in, d_out) over the sites).
    pub fn new(ranks: &[u32], max_allowed: u32) -> Result<Self, EnvError> {
        let allowed = format!(
            "a non-empty list of distinct ranks, each <= {max_allowed} (min(d_in, d_out) of the smallest site), at most 255 entries"
        );
        if ranks.is_empty() || ranks.len() > 255 {
            return Err(EnvError::Config { key: "ranks".into(), found: format!("{ranks:?}"), allowed });
        }
        let mut sorted = ranks.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != ranks.len() || *sorted.last().unwrap() > max_allowed {
            return Err(EnvError::Config { key: "ranks".into(), found: format!("{ranks:?}"), allowed });
        }
        let max = *sorted.last().unwrap() as usize;
        let mut index_of = vec![u8::MAX; max + 1];
        for (i, &r) in sorted.iter().enumerate() {
            index_of[r as usize] = i as u8;
        }
        Ok(Self { ranks: sorted, index_of })
    }

    /// The ranks, ascending.
    pub fn ranks(&self) -> &[u32] {
        &self.ranks
    }

    /// Number of ranks in the set.
    pub fn len(&self) -> usize {
        self.ranks.len()
    }

    /// Always false (a rank set is never empty); present for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.ranks.is_empty()
    }

    /// The largest rank.
    pub fn max(&self) -> u32 {
        *self.ranks.last().unwrap()
    }

    /// Position of `rank` in the set, if it is in it.
    #[inline]
    pub fn index_of(&self, rank: u32) -> Option<usize> {
        match self.index_of.get(rank as usize) {
            Some(&i) if i != u8::MAX => Some(i as usize),
            _ => None,
        }
    }

    /// The rank at position `i`.
    #[inline]
    pub fn rank(&self, i: usize) -> u32 {
        self.ranks[i]
    }
}

/// ln k for k = 0..=256, so that k^(−2β) = exp(−2β·ln k) needs one `exp` and no `ln`.
fn ln_table() -> &'static [f64; 257] {
    use std::sync::OnceLock;
    static T: OnceLock<[f64; 257]> = OnceLock::new();
    T.get_or_init(|| {
        let mut t = [0.0; 257];
        for (k, v) in t.iter_mut().enumerate().skip(1) {
            *v = (k as f64).ln();
        }
        t
    })
}

/// Energy tables of a power-law spectrum σ_k = a·k^(−β), k = 1..=k_max, at the ranks of a set.
///
/// Writes `energy[j]` = E(r_j) = Σ_{k≤r_j} σ_k² / Σ_k σ_k² and `tail[j]` = σ_{r_j}² / Σ_{k≤r_j} σ_k²
/// (the energy share of the smallest captured singular value; 0 at rank 0) and returns the
/// total energy Σ_k σ_k². Ranks above k_max capture everything.
///
/// The head (k ≤ largest rank in the set) is summed exactly; the tail beyond it uses the
/// Euler–Maclaurin formula (integral + end-point and first-derivative corrections), whose
/// relative error is below 1e-9 for k ≥ 65 — this keeps a 4096-wide site at ~64 `exp` calls per
/// episode reset instead of 4096.
pub fn power_law_tables(a: f64, beta: f64, k_max: u32, ranks: &[u32], energy: &mut [f32], tail: &mut [f32]) -> f64 {
    let s = 2.0 * beta;
    let head = ranks.last().copied().unwrap_or(0).min(k_max) as usize;
    let lnt = ln_table();
    let term = |k: usize| -> f64 { if k < lnt.len() { (-s * lnt[k]).exp() } else { (k as f64).powf(-s) } };
    // Head prefix sums, recorded at each rank of the set.
    let mut prefix = 0.0;
    let mut j = 0;
    let mut prefix_at = [0.0f64; 256];
    let mut last_at = [0.0f64; 256];
    while j < ranks.len() && ranks[j] == 0 {
        j += 1;
    }
    for k in 1..=head {
        let t = term(k);
        prefix += t;
        while j < ranks.len() && ranks[j] as usize == k {
            prefix_at[j] = prefix;
            last_at[j] = t;
            j += 1;
        }
    }
    // Tail sum Σ_{k=head+1}^{k_max} k^(−s) by Euler–Maclaurin.
    let n = k_max as usize;
    let tail_sum = if n > head {
        let m = (head + 1) as f64;
        let kk = n as f64;
        let f = |x: f64| x.powf(-s);
        let df = |x: f64| -s * x.powf(-s - 1.0);
        let integral =
            if (1.0 - s).abs() < 1e-12 { (kk / m).ln() } else { (kk.powf(1.0 - s) - m.powf(1.0 - s)) / (1.0 - s) };
        if n - head <= 64 {
            (head + 1..=n).map(|k| (k as f64).powf(-s)).sum()
        } else {
            integral + 0.5 * (f(m) + f(kk)) + (df(kk) - df(m)) / 12.0
        }
    } else {
        0.0
    };
    let total = prefix + tail_sum;
    for (i, &r) in ranks.iter().enumerate() {
        if r == 0 {
            energy[i] = 0.0;
            tail[i] = 0.0;
        } else if r as usize > head {
            // r above k_max: everything captured; smallest captured σ is σ_kmax.
            energy[i] = 1.0;
            tail[i] = (term(n.max(1)) / total) as f32;
        } else {
            energy[i] = (prefix_at[i] / total) as f32;
            tail[i] = (last_at[i] / prefix_at[i]) as f32;
        }
    }
    a * a * total
}

/// Energy tables of an explicit spectrum (σ_1 ≥ σ_2 ≥ …, e.g. from a calibration file) plus
/// `tail_energy` = energy beyond the listed values. Same outputs as [`power_law_tables`].
pub fn explicit_tables(
    sigma: &[f64],
    tail_energy: f64,
    scale: f64,
    ranks: &[u32],
    energy: &mut [f32],
    tail: &mut [f32],
) -> f64 {
    let total: f64 = sigma.iter().map(|s| s * s).sum::<f64>() + tail_energy;
    let total = total.max(f64::MIN_POSITIVE);
    for (i, &r) in ranks.iter().enumerate() {
        let r = (r as usize).min(sigma.len());
        if r == 0 {
            energy[i] = 0.0;
            tail[i] = 0.0;
            continue;
        }
        let p: f64 = sigma[..r].iter().map(|s| s * s).sum();
        energy[i] = (p / total) as f32;
        tail[i] = if p > 0.0 { (sigma[r - 1] * sigma[r - 1] / p) as f32 } else { 0.0 };
    }
    scale * scale * total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn euler_maclaurin_matches_direct_sum() {
        let ranks = [0u32, 1, 2, 4, 8, 16, 32, 64];
        for &beta in &[0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.5] {
            for &k_max in &[64u32, 100, 1024, 4096, 11008] {
                let mut e = [0f32; 8];
                let mut t = [0f32; 8];
                let total = power_law_tables(1.0, beta, k_max, &ranks, &mut e, &mut t);
                let direct: f64 = (1..=k_max).map(|k| (k as f64).powf(-2.0 * beta)).sum();
                assert!(((total - direct) / direct).abs() < 1e-8, "beta {beta} k {k_max}: {total} vs {direct}");
                for (j, &r) in ranks.iter().enumerate() {
                    let p: f64 = (1..=r.min(k_max)).map(|k| (k as f64).powf(-2.0 * beta)).sum();
                    assert!((e[j] as f64 - p / direct).abs() < 1e-6);
                }
            }
        }
    }

    #[test]
    fn larger_rank_never_raises_the_floor() {
        let ranks = [0u32, 1, 2, 4, 8, 16, 32, 64];
        for &beta in &[0.1, 0.5, 1.0, 3.0] {
            let mut e = [0f32; 8];
            let mut t = [0f32; 8];
            power_law_tables(2.0, beta, 512, &ranks, &mut e, &mut t);
            for w in e.windows(2) {
                assert!(1.0 - w[1] <= 1.0 - w[0], "{e:?}");
            }
        }
        let sigma = [5.0, 3.0, 3.0, 1.0, 0.5];
        let mut e = [0f32; 8];
        let mut t = [0f32; 8];
        explicit_tables(&sigma, 0.1, 1.0, &ranks, &mut e, &mut t);
        for w in e.windows(2) {
            assert!(w[1] >= w[0]);
        }
    }

    #[test]
    fn rank_set_errors() {
        assert!(RankSet::new(&[], 64).unwrap_err().to_string().contains("ranks"));
        let e = RankSet::new(&[0, 8, 128], 64).unwrap_err().to_string();
        assert!(e.contains("ranks") && e.contains("<= 64"), "{e}");
        assert!(RankSet::new(&[4, 4], 64).is_err());
        let s = RankSet::new(&[8, 0, 2], 64).unwrap();
        assert_eq!(s.ranks(), &[0, 2, 8]);
        assert_eq!(s.index_of(8), Some(2));
        assert_eq!(s.index_of(3), None);
        assert_eq!(s.index_of(1000), None);
    }

    #[test]
    fn llama_shapes() {
        let s = llama_sites(32, 4096, 11008, &[Role::Q, Role::K, Role::V, Role::O, Role::Gate, Role::Up, Role::Down]);
        assert_eq!(s.len(), 224);
        assert_eq!((s[4].d_in, s[4].d_out), (4096, 11008));
        assert_eq!((s[6].d_in, s[6].d_out), (11008, 4096));
        assert_eq!(s[6].name, "layers.0.mlp.down_proj");
    }
}
