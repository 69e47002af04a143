//! DDIM refinement of the PPO plan (AirLLM's second stage).
//!
//! A denoiser over the per-site rank vector x ∈ [−1, 1]^L (rank index k ↦ 2k/(K−1) − 1),
//! conditioned on the PPO coarse plan and the observation. Like the policy network it is shared
//! across sites, so it serves any number of sites: every site's ε̂_i is computed from
//!
//! ```text
//! [ x_t,i ‖ c·coarse_i ‖ c ‖ site features_i ‖ pooled site features ‖ global features ‖ emb(t) ]
//! ```
//!
//! where c ∈ {0, 1} says whether the condition is present. AirLLM drops the condition by zeroing
//! the coarse vector; since 0 is also a valid coarse value (a middle rank), the flag c makes the
//! unconditional input unambiguous.
//!
//! - Noise schedule (AirLLM): T = 1000 steps, √β linear from √1e-4 to √2e-2.
//! - Training: ε-prediction MSE on replayed (observation, coarse plan, executed plan, reward)
//!   tuples, weighted per sample by `clamp(1 + 0.1·z(R), 0.1, 10)` with z the batch-standardized
//!   reward; the condition is dropped with probability 0.1 (classifier-free guidance training).
//! - Sampling: deterministic DDIM (η = 0) over `sample_steps` evenly spaced timesteps, starting
//!   from seeded Gaussian noise; ε = ε_u + w·(ε_c − ε_u) with guidance w = 1.5; x̂₀ clamped to
//!   [−1, 1] at every step.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

/// DDIM stage hyperparameters (AirLLM's values as defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DdimConfig {
    /// Use the refinement stage at all (on by default only if it helps: see the README table).
    pub enabled: bool,
    /// Diffusion timesteps T used in training (default 1000).
    pub train_steps: usize,
    /// DDIM sampling steps (default 10; AirLLM uses 50).
    pub sample_steps: usize,
    /// Smallest β (default 1e-4).
    pub beta_start: f64,
    /// Largest β (default 2e-2).
    pub beta_end: f64,
    /// Classifier-free guidance weight w (default 1.5).
    pub guidance: f64,
    /// Probability of dropping the condition in training (default 0.1).
    pub cond_drop: f64,
    /// Hidden width of the denoiser (default 128).
    pub hidden: i64,
    /// Adam learning rate (default 5e-5... AirLLM; we use 3e-4 for the short runs).
    pub learning_rate: f64,
    /// Replay buffer capacity in decisions (default 10 000).
    pub replay_capacity: usize,
    /// Decisions in the buffer before the denoiser trains or is used (default 512).
    pub warmup: usize,
    /// Denoiser minibatch size (default 64).
    pub batch_size: usize,
    /// Denoiser gradient steps after each PPO update (default 16).
    pub updates_per_iteration: usize,
    /// Reward-weight temperature: weight = clamp(1 + reward_weight·z(R), 0.1, 10) (default 0.1).
    pub reward_weight: f64,
}

impl Default for DdimConfig {
    fn default() -> Self {
        DdimConfig {
            enabled: false,
            train_steps: 1000,
            sample_steps: 10,
            beta_start: 1e-4,
            beta_end: 2e-2,
            guidance: 1.5,
            cond_drop: 0.1,
            hidden: 128,
            learning_rate: 3e-4,
            replay_capacity: 10_000,
            warmup: 512,
            batch_size: 64,
            updates_per_iteration: 16,
            reward_weight: 0.1,
        }
    }
}

impl rankpilot_config::Validate for DdimConfig {
    fn validate(&self, v: &mut rankpilot_config::Violations) {
        v.check(self.train_steps >= 2, "train_steps", self.train_steps, "an integer >= 2");
        v.check(
            self.sample_steps >= 1 && self.sample_steps <= self.train_steps,
            "sample_steps",
            self.sample_steps,
            "an integer in [1, train_steps]",
        );
        v.check(
            self.beta_start > 0.0 && self.beta_start < self.beta_end && self.beta_end < 1.0,
            "beta_start",
            (self.beta_start, self.beta_end),
            "0 < beta_start < beta_end < 1",
        );
        v.check(self.guidance >= 0.0, "guidance", self.guidance, "a number >= 0");
        v.check((0.0..1.0).contains(&self.cond_drop), "cond_drop", self.cond_drop, "a number in [0, 1)");
        v.check(self.hidden >= 1, "hidden", self.hidden, "an integer >= 1");
        v.check(self.learning_rate > 0.0, "learning_rate", self.learning_rate, "a number > 0");
        v.check(
            self.replay_capacity >= self.batch_size,
            "replay_capacity",
            self.replay_capacity,
            "an integer >= batch_size",
        );
        v.check(self.batch_size >= 2, "batch_size", self.batch_size, "an integer >= 2");
    }
}

const TIME_EMB: i64 = 32;

/// ᾱ_t for the √β-linear schedule.
pub fn alpha_bar(cfg: &DdimConfig) -> Vec<f64> {
    let (a, b) = (cfg.beta_start.sqrt(), cfg.beta_end.sqrt());
    let n = cfg.train_steps;
    let mut prod = 1.0;
    (0..n)
        .map(|t| {
            let s = a + (b - a) * t as f64 / (n - 1) as f64;
            prod *= 1.0 - s * s;
            prod
        })
        .collect()
}

/// Sinusoidal embedding of integer timesteps [B] → [B, TIME_EMB].
fn time_embedding(t: &Tensor) -> Tensor {
    let half = TIME_EMB / 2;
    let freqs = (Tensor::arange(half, (Kind::Float, t.device())) * (-(10_000f64.ln()) / half as f64)).exp();
    let args = t.to_kind(Kind::Float).unsqueeze(-1) * freqs.unsqueeze(0);
    Tensor::cat(&[args.sin(), args.cos()], -1)
}

/// The ε-prediction network.
#[derive(Debug)]
pub struct Denoiser {
    l1: nn::Linear,
    l2: nn::Linear,
    l3: nn::Linear,
    out: nn::Linear,
}

impl Denoiser {
    /// Variables under `p` for the given feature counts.
    pub fn new(p: &nn::Path, global_dim: i64, site_dim: i64, hidden: i64) -> Self {
        let input = 3 + 2 * site_dim + global_dim + TIME_EMB;
        Denoiser {
            l1: nn::linear(p / "l1", input, hidden, Default::default()),
            l2: nn::linear(p / "l2", hidden, hidden, Default::default()),
            l3: nn::linear(p / "l3", hidden, hidden, Default::default()),
            out: nn::linear(p / "out", hidden, 1, Default::default()),
        }
    }

    /// ε̂ [B, L] from x_t [B, L], coarse [B, L], condition flag [B], t [B] (int64),
    /// normalized features `global` [B, G], `sites` [B, L, F], `mask` [B, L].
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x_t: &Tensor,
        coarse: &Tensor,
        cond: &Tensor,
        t: &Tensor,
        global: &Tensor,
        sites: &Tensor,
        mask: &Tensor,
    ) -> Tensor {
        let l = sites.size()[1];
        let m = mask.unsqueeze(-1);
        let pooled = (sites * &m).sum_dim_intlist(1, false, Kind::Float)
            / m.sum_dim_intlist(1, false, Kind::Float).clamp_min(1.0);
        let per_state = Tensor::cat(&[pooled, global.shallow_clone(), time_embedding(t)], -1)
            .unsqueeze(1)
            .expand([-1, l, -1], false);
        let c = cond.unsqueeze(-1);
        let input = Tensor::cat(
            &[
                x_t.unsqueeze(-1),
                (coarse * &c).unsqueeze(-1),
                c.unsqueeze(-1).expand([-1, l, 1], false),
                sites.shallow_clone(),
                per_state,
            ],
            -1,
        );
        let h = self.l1.forward(&input).mish();
        let h = &h + self.l2.forward(&h).mish();
        let h = &h + self.l3.forward(&h).mish();
        self.out.forward(&h).squeeze_dim(-1) * mask
    }

    /// Reward-weighted denoising loss on a replay minibatch; `x0` and `coarse` in [−1, 1].
    #[allow(clippy::too_many_arguments)]
    pub fn loss(
        &self,
        cfg: &DdimConfig,
        alpha_bar: &Tensor,
        x0: &Tensor,
        coarse: &Tensor,
        rewards: &Tensor,
        global: &Tensor,
        sites: &Tensor,
        mask: &Tensor,
        rng: &mut ChaCha8Rng,
    ) -> Tensor {
        let (b, l) = (x0.size()[0], x0.size()[1]);
        let dev = x0.device();
        let t: Vec<i64> = (0..b).map(|_| rng.random_range(0..cfg.train_steps as i64)).collect();
        let t = Tensor::from_slice(&t).to_device(dev);
        let eps = gaussian(rng, &[b, l], dev);
        let ab = alpha_bar.index_select(0, &t).unsqueeze(-1);
        let x_t = &ab.sqrt() * x0 + (-&ab + 1.0).sqrt() * &eps;
        let cond: Vec<f32> = (0..b).map(|_| if rng.random::<f64>() < cfg.cond_drop { 0.0 } else { 1.0 }).collect();
        let cond = Tensor::from_slice(&cond).to_device(dev);
        let pred = self.forward(&x_t, coarse, &cond, &t, global, sites, mask);
        let z = (rewards - rewards.mean(Kind::Float)) / (rewards.std(true) + 1e-8);
        let w = (z * cfg.reward_weight + 1.0).clamp(0.1, 10.0);
        let per_sample = ((pred - eps).square() * mask).sum_dim_intlist(1, false, Kind::Float)
            / mask.sum_dim_intlist(1, false, Kind::Float).clamp_min(1.0);
        (per_sample * &w).sum(Kind::Float) / w.sum(Kind::Float)
    }

    /// Deterministic DDIM sampling (η = 0) with classifier-free guidance. Returns x̂₀ [B, L].
    #[allow(clippy::too_many_arguments)]
    pub fn sample(
        &self,
        cfg: &DdimConfig,
        alpha_bar: &[f64],
        coarse: &Tensor,
        global: &Tensor,
        sites: &Tensor,
        mask: &Tensor,
        rng: &mut ChaCha8Rng,
    ) -> Tensor {
        tch::no_grad(|| {
            let (b, l) = (coarse.size()[0], coarse.size()[1]);
            let dev = coarse.device();
            let n = cfg.train_steps;
            let s = cfg.sample_steps;
            // Evenly spaced timesteps from T−1 down to 0.
            let times: Vec<usize> = (0..s).map(|i| (n - 1) - i * (n - 1) / s.max(1)).collect();
            let mut x = gaussian(rng, &[b, l], dev) * mask;
            let on = Tensor::ones([b], (Kind::Float, dev));
            let off = Tensor::zeros([b], (Kind::Float, dev));
            for (i, &t) in times.iter().enumerate() {
                let tt = Tensor::full([b], t as i64, (Kind::Int64, dev));
                let e_c = self.forward(&x, coarse, &on, &tt, global, sites, mask);
                let e_u = self.forward(&x, coarse, &off, &tt, global, sites, mask);
                let eps = &e_u + (e_c - &e_u) * cfg.guidance;
                let ab = alpha_bar[t];
                let x0 = ((&x - &eps * (1.0 - ab).sqrt()) / ab.sqrt()).clamp(-1.0, 1.0);
                x = match times.get(i + 1) {
                    Some(&t_next) => {
                        let ab_next = alpha_bar[t_next];
                        // Re-derive ε from the clamped x̂₀ so the step stays consistent with it.
                        let eps = (&x - &x0 * ab.sqrt()) / (1.0 - ab).sqrt();
                        &x0 * ab_next.sqrt() + eps * (1.0 - ab_next).sqrt()
                    }
                    None => x0,
                };
                x *= mask;
            }
            x
        })
    }
}

fn gaussian(rng: &mut ChaCha8Rng, shape: &[i64], dev: Device) -> Tensor {
    let n: i64 = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
    Tensor::from_slice(&v).view(shape).to_device(dev)
}

/// Rank index ↦ [−1, 1].
pub fn encode(index: usize, n_ranks: usize) -> f32 {
    if n_ranks <= 1 { 0.0 } else { 2.0 * index as f32 / (n_ranks - 1) as f32 - 1.0 }
}

/// [−1, 1] ↦ nearest rank index.
pub fn decode(x: f32, n_ranks: usize) -> usize {
    if n_ranks <= 1 {
        return 0;
    }
    (((x.clamp(-1.0, 1.0) + 1.0) / 2.0 * (n_ranks - 1) as f32).round() as usize).min(n_ranks - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn schedule_and_codec() {
        let ab = alpha_bar(&DdimConfig::default());
        assert_eq!(ab.len(), 1000);
        assert!((ab[0] - (1.0 - 1e-4)).abs() < 1e-12);
        assert!(ab.windows(2).all(|w| w[1] < w[0]));
        assert!(ab[999] < 0.01, "noise dominates at T: {}", ab[999]);
        for k in 0..8 {
            assert_eq!(decode(encode(k, 8), 8), k);
        }
        assert_eq!(decode(5.0, 8), 7);
    }

    #[test]
    fn denoiser_learns_to_copy_the_condition() {
        // With x0 = coarse, a trained denoiser should return the coarse plan: a small end-to-end
        // check that training and sampling agree on conventions.
        tch::manual_seed(0);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let cfg = DdimConfig { hidden: 64, train_steps: 100, sample_steps: 10, guidance: 1.0, ..Default::default() };
        let vs = nn::VarStore::new(Device::Cpu);
        let den = Denoiser::new(&vs.root(), 1, 1, cfg.hidden);
        let mut opt = nn::OptimizerConfig::build(nn::Adam::default(), &vs, 3e-3).unwrap();
        let ab_vec = alpha_bar(&cfg);
        let ab = Tensor::from_slice(&ab_vec).to_kind(Kind::Float);
        let (b, l) = (64, 4);
        for _ in 0..400 {
            let idx: Vec<f32> = (0..b * l).map(|_| encode(rng.random_range(0..8), 8)).collect();
            let x0 = Tensor::from_slice(&idx).view([b, l]);
            let loss = den.loss(
                &cfg,
                &ab,
                &x0,
                &x0,
                &Tensor::zeros([b], (Kind::Float, Device::Cpu)),
                &Tensor::zeros([b, 1], (Kind::Float, Device::Cpu)),
                &Tensor::zeros([b, l, 1], (Kind::Float, Device::Cpu)),
                &Tensor::ones([b, l], (Kind::Float, Device::Cpu)),
                &mut rng,
            );
            opt.backward_step(&loss);
        }
        let target: Vec<f32> = (0..8).map(|k| encode(k % 8, 8)).collect();
        let coarse = Tensor::from_slice(&target).view([2, 4]);
        let x = den.sample(
            &cfg,
            &ab_vec,
            &coarse,
            &Tensor::zeros([2, 1], (Kind::Float, Device::Cpu)),
            &Tensor::zeros([2, 4, 1], (Kind::Float, Device::Cpu)),
            &Tensor::ones([2, 4], (Kind::Float, Device::Cpu)),
            &mut rng,
        );
        let got: Vec<f32> = Vec::try_from(x.flatten(0, -1)).unwrap();
        let hits = got.iter().zip(&target).filter(|(g, t)| decode(**g, 8) == decode(**t, 8)).count();
        assert!(hits >= 6, "denoiser reproduced {hits}/8 ranks: {got:?}");
    }
}
