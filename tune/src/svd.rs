//! Low-rank linear algebra for LoRA resizing: the QR-core SVD of a factored product and the
//! randomized SVD (Halko, Martinsson & Tropp 2011) of a full matrix.
//!
//! All routines compute in at least `f32` (bf16/f16 inputs are up-cast) on the input's device.
//! On the CPU libtorch's `linalg_svd` with an empty driver string fails (tch passes `""` as a
//! present driver), so the SVDs here use `Tensor::svd(some = true)`, which returns `V`, not `Vᵀ`.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Kind, Tensor};

/// Runs `f` with libtorch limited to one intra-op thread when `device` is the CPU (restoring the
/// previous count afterwards). The factorizations of a resize work on `d × r` panels too small to
/// gain from threads, and on small shared machines multi-threaded LAPACK calls can stall for
/// hundreds of milliseconds when a core is taken by another process (measured: a 4096×64 QR in
/// 0.35 s on 2 threads against 5 ms on one).
pub fn single_threaded<T>(device: tch::Device, f: impl FnOnce() -> T) -> T {
    if device != tch::Device::Cpu {
        return f();
    }
    let n = tch::get_num_threads();
    if n <= 1 {
        return f();
    }
    tch::set_num_threads(1);
    let out = f();
    tch::set_num_threads(n);
    out
}

/// A thin SVD `M = U · diag(S) · Vᵀ`, singular values in descending order.
#[derive(Debug)]
pub struct Svd {
    /// Left singular vectors, `[m, k]`, orthonormal columns.
    pub u: Tensor,
    /// Singular values, `[k]`, descending.
    pub s: Tensor,
    /// Right singular vectors, `[n, k]`, orthonormal columns (not transposed).
    pub v: Tensor,
}

impl Svd {
    /// Keeps the leading `k` triplets.
    pub fn truncate(&self, k: usize) -> Svd {
        let k = k as i64;
        Svd { u: self.u.narrow(1, 0, k), s: self.s.narrow(0, 0, k), v: self.v.narrow(1, 0, k) }
    }

    /// `U · diag(S) · Vᵀ`.
    pub fn reconstruct(&self) -> Tensor {
        (&self.u * self.s.unsqueeze(0)).matmul(&self.v.tr())
    }

    /// The singular values as `f64`s.
    pub fn values(&self) -> Vec<f64> {
        Vec::<f64>::try_from(self.s.to_kind(Kind::Double).to_device(tch::Device::Cpu)).unwrap_or_default()
    }
}

fn working_kind(t: &Tensor) -> Kind {
    match t.kind() {
        Kind::Double => Kind::Double,
        _ => Kind::Float,
    }
}

/// Thin SVD of a full matrix (exact, LAPACK / cuSOLVER).
pub fn svd(m: &Tensor) -> Svd {
    let m = m.to_kind(working_kind(m));
    let (u, s, v) = m.svd(true, true);
    Svd { u, s, v }
}

/// SVD of `B · A` for `B ∈ R^{m×r}`, `A ∈ R^{r×n}` without forming the product (LoRA-Squeeze's
/// memory-efficient route): `B = Q_B R_B`, `Aᵀ = Q_A R_A`, so `B·A = Q_B (R_B R_Aᵀ) Q_Aᵀ`; the
/// SVD of the `r×r` core `R_B R_Aᵀ = U_c Σ V_cᵀ` gives `B·A = (Q_B U_c) Σ (Q_A V_c)ᵀ`.
/// Cost `O((m + n) r²)`; exact up to float error. Returns `r` triplets (`min(r, m, n)`).
pub fn qr_core_svd(b: &Tensor, a: &Tensor) -> Svd {
    let kind = working_kind(b);
    let (qb, rb) = Tensor::linalg_qr(&b.to_kind(kind), "reduced");
    let (qa, ra) = Tensor::linalg_qr(&a.to_kind(kind).tr(), "reduced");
    let core = rb.matmul(&ra.tr());
    let (uc, s, vc) = core.svd(true, true);
    Svd { u: qb.matmul(&uc), s, v: qa.matmul(&vc) }
}

/// LoRA-Squeeze's rank reduction of `B·A` (`b: [m, r]`, `a: [r, n]`) to rank `k` by the QR-core
/// SVD, the kept singular values split evenly between the factors and multiplied by `gain`
/// (the ratio of old to new LoRA scaling): returns `(B' [m, k], A' [k, n], σ)` with
/// `B'·A' = gain · (best rank-k approximation of B·A)` and `σ` all `r` singular values of `B·A`.
/// Only the kept `k` directions are carried back through the orthonormal bases.
pub fn squeeze_factors(b: &Tensor, a: &Tensor, k: usize, gain: f64) -> (Tensor, Tensor, Tensor) {
    let kind = working_kind(b);
    let (qb, rb) = Tensor::linalg_qr(&b.to_kind(kind), "reduced");
    let (qa, ra) = Tensor::linalg_qr(&a.to_kind(kind).tr(), "reduced");
    let (uc, s, vc) = rb.matmul(&ra.tr()).svd(true, true);
    let k = k as i64;
    let root = (s.narrow(0, 0, k) * gain).sqrt();
    let b2 = qb.matmul(&uc.narrow(1, 0, k)) * root.unsqueeze(0);
    let a2 = root.unsqueeze(1) * vc.narrow(1, 0, k).tr().matmul(&qa.tr());
    (b2, a2, s)
}

/// Settings of the randomized SVD.
#[derive(Debug, Clone, Copy)]
pub struct RsvdOptions {
    /// Extra random directions beyond the target rank (`p`; Halko et al. suggest 5–10).
    pub oversample: usize,
    /// Subspace (power) iterations `q`; each sharpens a slowly decaying spectrum by `σ^(2q+1)`.
    pub power_iters: usize,
    /// Seed of the Gaussian test matrix (drawn by rankpilot's own generator, not libtorch's).
    pub seed: u64,
}

impl Default for RsvdOptions {
    fn default() -> Self {
        RsvdOptions { oversample: 10, power_iters: 2, seed: 0 }
    }
}

/// A seeded `N(0, 1)` matrix `[rows, cols]` of `kind` on `device` (Box–Muller from ChaCha8).
pub fn gaussian(rows: usize, cols: usize, seed: u64, kind: Kind, device: tch::Device) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = rows * cols;
    let mut v = Vec::with_capacity(n + 1);
    while v.len() < n {
        let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.random();
        let r = (-2.0 * u1.ln()).sqrt();
        let t = std::f64::consts::TAU * u2;
        v.push((r * t.cos()) as f32);
        v.push((r * t.sin()) as f32);
    }
    v.truncate(n);
    Tensor::from_slice(&v).view([rows as i64, cols as i64]).to_kind(kind).to_device(device)
}

/// Rank-`k` randomized SVD of `m` (`[rows, cols]`), Halko–Martinsson–Tropp Algorithms 4.4 + 5.1:
/// range finder with `k + oversample` Gaussian probes, `power_iters` QR-stabilized subspace
/// iterations, then an exact SVD of the small projected matrix `Qᵀ M`.
///
/// Expected error (Halko et al., Thm. 10.5, no power iterations):
/// `E‖M − U S Vᵀ‖_F ≤ (1 + k/(p−1))^{1/2} (Σ_{j>k} σ_j²)^{1/2}` before truncation to `k`.
/// On flat spectra no amount of oversampling helps: the tail is as large as the head.
pub fn randomized_svd(m: &Tensor, k: usize, opt: RsvdOptions) -> Svd {
    let kind = working_kind(m);
    let m = m.to_kind(kind);
    let (rows, cols) = (m.size()[0] as usize, m.size()[1] as usize);
    let l = (k + opt.oversample).min(rows).min(cols);
    let omega = gaussian(cols, l, opt.seed, kind, m.device());
    let (mut q, _) = Tensor::linalg_qr(&m.matmul(&omega), "reduced");
    let mt = m.tr();
    for _ in 0..opt.power_iters {
        let (z, _) = Tensor::linalg_qr(&mt.matmul(&q), "reduced");
        q = Tensor::linalg_qr(&m.matmul(&z), "reduced").0;
    }
    let small = q.tr().matmul(&m); // [l, cols]
    let (ub, s, v) = small.svd(true, true);
    Svd { u: q.matmul(&ub), s, v }.truncate(k.min(l))
}

/// The smallest rank whose singular values keep at least `energy` of `Σ σ²` (at least 1 when
/// any value is non-zero, 0 for an all-zero spectrum).
pub fn energy_rank(s: &[f64], energy: f64) -> usize {
    let total: f64 = s.iter().map(|x| x * x).sum();
    if total <= 0.0 {
        return 0;
    }
    let mut acc = 0.0;
    for (i, x) in s.iter().enumerate() {
        acc += x * x;
        if acc >= energy * total * (1.0 - 1e-12) {
            return i + 1;
        }
    }
    s.len()
}

/// A `rows × cols` matrix with prescribed singular values `spectrum` and seeded random
/// orthonormal singular vectors (for tests and benchmarks).
pub fn matrix_with_spectrum(rows: usize, cols: usize, spectrum: &[f64], seed: u64, kind: Kind) -> Tensor {
    let k = spectrum.len();
    let dev = tch::Device::Cpu;
    let (u, _) = Tensor::linalg_qr(&gaussian(rows, k, seed, kind, dev), "reduced");
    let (v, _) = Tensor::linalg_qr(&gaussian(cols, k, seed.wrapping_add(1), kind, dev), "reduced");
    let s = Tensor::from_slice(spectrum).to_kind(kind);
    (u * s.unsqueeze(0)).matmul(&v.tr())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fro(t: &Tensor) -> f64 {
        t.to_kind(Kind::Double).norm().double_value(&[])
    }

    #[test]
    fn qr_core_matches_full_svd() {
        let b = gaussian(40, 6, 1, Kind::Double, tch::Device::Cpu);
        let a = gaussian(6, 30, 2, Kind::Double, tch::Device::Cpu);
        let dw = b.matmul(&a);
        let core = qr_core_svd(&b, &a);
        let full = svd(&dw);
        let sc = core.values();
        let sf = full.values();
        for i in 0..6 {
            assert!((sc[i] - sf[i]).abs() < 1e-9 * sf[0], "{sc:?} vs {sf:?}");
        }
        assert!(fro(&(core.reconstruct() - &dw)) < 1e-9 * fro(&dw));
        // Orthonormal factors.
        let eye = Tensor::eye(6, (Kind::Double, tch::Device::Cpu));
        assert!(fro(&(core.u.tr().matmul(&core.u) - &eye)) < 1e-10);
        assert!(fro(&(core.v.tr().matmul(&core.v) - &eye)) < 1e-10);
    }

    #[test]
    fn randomized_svd_within_halko_bound_on_decaying_spectra() {
        let (m, n, k, p) = (300usize, 200usize, 10usize, 8usize);
        for (name, spectrum) in [
            ("power", (1..=n).map(|j| (j as f64).powf(-1.5)).collect::<Vec<_>>()),
            ("exp", (0..n).map(|j| (-(j as f64) / 8.0).exp()).collect::<Vec<_>>()),
        ] {
            let mat = matrix_with_spectrum(m, n, &spectrum, 7, Kind::Double);
            let tail: f64 = spectrum[k..].iter().map(|x| x * x).sum::<f64>().sqrt();
            let best = fro(&(svd(&mat).truncate(k).reconstruct() - &mat));
            assert!((best - tail).abs() < 1e-8 * (1.0 + tail), "{name}: exact {best} vs tail {tail}");
            for q in [0usize, 2] {
                let approx = randomized_svd(&mat, k, RsvdOptions { oversample: p, power_iters: q, seed: 11 });
                let err = fro(&(approx.reconstruct() - &mat));
                // Thm 10.5 bounds the un-truncated projection error; truncating the projected
                // matrix to rank k at most adds the same bound again (Thm 9.3 / Gu 2015).
                let bound = (1.0 + k as f64 / (p as f64 - 1.0)).sqrt() * tail;
                assert!(err <= 2.0 * bound, "{name} q={q}: err {err} > 2·bound {bound}");
                assert!(err >= best * (1.0 - 1e-9));
                if q == 2 {
                    assert!(err <= 1.05 * best, "{name}: power iterations should be near-optimal: {err} vs {best}");
                }
            }
        }
    }

    #[test]
    fn energy_rank_counts() {
        assert_eq!(energy_rank(&[3.0, 2.0, 1.0], 0.5), 1);
        assert_eq!(energy_rank(&[3.0, 2.0, 1.0], 0.9), 2);
        assert_eq!(energy_rank(&[3.0, 2.0, 1.0], 1.0), 3);
        assert_eq!(energy_rank(&[0.0, 0.0], 0.9), 0);
    }
}
