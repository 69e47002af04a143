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
//! - Sampling cost: the first layer is linear in its input, so the part that does not change
//!   between steps (the site, pooled and global features) is multiplied once per decision, and
//!   the conditional and unconditional passes of a step run as one batch
//!   ([`Denoiser::sample`]; [`Denoiser::sample_reference`] is the plain loop it is tested against).

use envs::{GLOBAL_FEATURES, SITE_FEATURES};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use crate::PolicyError;
use crate::adam::Adam;

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
    /// The plans the refiner learns to produce (default `executed`).
    #[serde(default)]
    pub target: DdimTarget,
    /// The denoiser's hidden activation (default `mish`, which every checkpoint written before
    /// this key existed was trained with).
    #[serde(default)]
    pub activation: DdimActivation,
}

/// The denoiser's hidden activation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DdimActivation {
    /// Mish, x·tanh(softplus(x)), as in the diffusion-policy networks AirLLM builds on.
    #[default]
    Mish,
    /// SiLU, x·σ(x). Its shape is close to Mish's at a fraction of the cost: Mish's
    /// transcendentals cost about as much as the two hidden matmuls of a sampling step at 224
    /// sites (`rankpilot bench policy` shows both).
    Silu,
}

impl DdimActivation {
    fn apply(self, x: &Tensor) -> Tensor {
        match self {
            DdimActivation::Mish => x.mish(),
            DdimActivation::Silu => x.silu(),
        }
    }
}

/// What the refiner imitates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DdimTarget {
    /// The executed plans of the replay, weighted by their reward (AirLLM's recipe).
    #[default]
    Executed,
    /// The privileged oracle's plan in the same state (teacher → student, issue 12 item 5);
    /// every tuple then weighs alike, since the reward belongs to the executed plan.
    Oracle,
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
            target: DdimTarget::Executed,
            activation: DdimActivation::Mish,
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
        v.check((1..=4096).contains(&self.hidden), "hidden", self.hidden, "an integer in [1, 4096]");
        v.check(self.learning_rate > 0.0, "learning_rate", self.learning_rate, "a number > 0");
        // The replay holds every observation of `replay_capacity` decisions in memory.
        v.check(
            self.replay_capacity >= self.batch_size && self.replay_capacity <= 1_000_000,
            "replay_capacity",
            self.replay_capacity,
            "an integer from batch_size to 1000000",
        );
        v.check((2..=65_536).contains(&self.batch_size), "batch_size", self.batch_size, "an integer in [2, 65536]");
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
    activation: DdimActivation,
}

impl Denoiser {
    /// Variables under `p` for the given feature counts.
    pub fn new(p: &nn::Path, global_dim: i64, site_dim: i64, hidden: i64, activation: DdimActivation) -> Self {
        let input = 3 + 2 * site_dim + global_dim + TIME_EMB;
        Denoiser {
            l1: nn::linear(p / "l1", input, hidden, Default::default()),
            l2: nn::linear(p / "l2", hidden, hidden, Default::default()),
            l3: nn::linear(p / "l3", hidden, hidden, Default::default()),
            out: nn::linear(p / "out", hidden, 1, Default::default()),
            activation,
        }
    }

    /// ε̂ [B, L] from x_t [B, L], coarse [B, L], condition flag [B], t [B] (int64) and the
    /// normalized observation `obs`.
    pub fn forward(&self, x_t: &Tensor, coarse: &Tensor, cond: &Tensor, t: &Tensor, obs: ObsTensors<'_>) -> Tensor {
        let ObsTensors { global, sites, mask } = obs;
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
        let act = |x: Tensor| self.activation.apply(&x);
        let h = act(self.l1.forward(&input));
        let h = &h + act(self.l2.forward(&h));
        let h = &h + act(self.l3.forward(&h));
        self.out.forward(&h).squeeze_dim(-1) * mask
    }

    /// Reward-weighted denoising loss on a replay minibatch; `x0` and `coarse` in [−1, 1].
    pub fn loss(&self, cfg: &DdimConfig, alpha_bar: &Tensor, batch: &ReplayBatch, rng: &mut ChaCha8Rng) -> Tensor {
        let ReplayBatch { x0, coarse, rewards, global, sites, mask } = batch;
        let obs = ObsTensors { global, sites, mask };
        let (b, l) = (x0.size()[0], x0.size()[1]);
        let dev = x0.device();
        let t: Vec<i64> = (0..b).map(|_| rng.random_range(0..cfg.train_steps as i64)).collect();
        let t = Tensor::from_slice(&t).to_device(dev);
        let eps = gaussian(rng, &[b, l], dev);
        let ab = alpha_bar.index_select(0, &t).unsqueeze(-1);
        let x_t = &ab.sqrt() * x0 + (-&ab + 1.0).sqrt() * &eps;
        let cond: Vec<f32> = (0..b).map(|_| if rng.random::<f64>() < cfg.cond_drop { 0.0 } else { 1.0 }).collect();
        let cond = Tensor::from_slice(&cond).to_device(dev);
        let pred = self.forward(&x_t, coarse, &cond, &t, obs);
        let z = (rewards - rewards.mean(Kind::Float)) / (rewards.std(true) + 1e-8);
        let w = match cfg.target {
            DdimTarget::Executed => (z * cfg.reward_weight + 1.0).clamp(0.1, 10.0),
            DdimTarget::Oracle => z.ones_like(),
        };
        let per_sample = ((pred - eps).square() * mask).sum_dim_intlist(1, false, Kind::Float)
            / mask.sum_dim_intlist(1, false, Kind::Float).clamp_min(1.0);
        (per_sample * &w).sum(Kind::Float) / w.sum(Kind::Float)
    }

    /// Deterministic DDIM sampling (η = 0) with classifier-free guidance. Returns x̂₀ [B, L].
    ///
    /// The same computation as [`Denoiser::sample_reference`], arranged for speed. l1's input
    /// is [x_t ‖ c·coarse ‖ c ‖ sites ‖ pooled ‖ global ‖ emb(t)], so its pre-activation splits
    /// into W_obs·obs + b (fixed for the decision, [B, L, H]), x_t·w_x (per step), c·(coarse·w_c
    /// + w_flag) (fixed, present only in the conditional pass) and W_t·emb(t) (one row per step).
    pub fn sample(
        &self,
        cfg: &DdimConfig,
        alpha_bar: &[f64],
        coarse: &Tensor,
        obs: ObsTensors<'_>,
        rng: &mut ChaCha8Rng,
    ) -> Tensor {
        let ObsTensors { global, sites, mask } = obs;
        tch::no_grad(|| {
            let (b, l) = (coarse.size()[0], coarse.size()[1]);
            let f = sites.size()[2];
            let g = global.size()[1];
            let dev = coarse.device();
            let times = sample_times(cfg);
            let w = &self.l1.ws; // [H, 3 + 2F + G + TIME_EMB]
            let col = |start: i64, len: i64| w.narrow(1, start, len);
            let (w_x, w_c, w_flag) = (col(0, 1).squeeze_dim(1), col(1, 1).squeeze_dim(1), col(2, 1).squeeze_dim(1));
            let (w_sites, w_state) = (col(3, f), col(3 + f, f + g));
            let w_time = col(3 + 2 * f + g, TIME_EMB);
            let m = mask.unsqueeze(-1);
            let pooled = (sites * &m).sum_dim_intlist(1, false, Kind::Float)
                / m.sum_dim_intlist(1, false, Kind::Float).clamp_min(1.0);
            let state = Tensor::cat(&[pooled, global.shallow_clone()], -1).matmul(&w_state.tr()); // [B, H]
            let mut fixed = sites.matmul(&w_sites.tr()) + state.unsqueeze(1); // [B, L, H]
            if let Some(bias) = &self.l1.bs {
                fixed += bias;
            }
            let cond_term = coarse.unsqueeze(-1) * &w_c + &w_flag; // [B, L, H]
            let t_all = Tensor::from_slice(&times.iter().map(|&t| t as i64).collect::<Vec<_>>()).to_device(dev);
            let time_terms = time_embedding(&t_all).matmul(&w_time.tr()); // [S, H]
            let mut x = gaussian(rng, &[b, l], dev) * mask;
            for (i, &t) in times.iter().enumerate() {
                let common = &fixed + x.unsqueeze(-1) * &w_x + time_terms.get(i as i64);
                // [2, B, L, H]: the conditional pass, then the unconditional one.
                let pre = Tensor::stack(&[&common + &cond_term, common], 0);
                let act = |x: Tensor| self.activation.apply(&x);
                let h = act(pre);
                let h = &h + act(self.l2.forward(&h));
                let h = &h + act(self.l3.forward(&h));
                let e = self.out.forward(&h).squeeze_dim(-1) * mask;
                let (e_c, e_u) = (e.get(0), e.get(1));
                let eps = &e_u + (e_c - &e_u) * cfg.guidance;
                x = ddim_step(&x, &eps, alpha_bar, t, times.get(i + 1).copied()) * mask;
            }
            x
        })
    }

    /// The plain sampling loop: two full forward passes per step. Kept as the reference that
    /// [`Denoiser::sample`] is tested against.
    pub fn sample_reference(
        &self,
        cfg: &DdimConfig,
        alpha_bar: &[f64],
        coarse: &Tensor,
        obs: ObsTensors<'_>,
        rng: &mut ChaCha8Rng,
    ) -> Tensor {
        let mask = obs.mask;
        tch::no_grad(|| {
            let (b, l) = (coarse.size()[0], coarse.size()[1]);
            let dev = coarse.device();
            let times = sample_times(cfg);
            let mut x = gaussian(rng, &[b, l], dev) * mask;
            let on = Tensor::ones([b], (Kind::Float, dev));
            let off = Tensor::zeros([b], (Kind::Float, dev));
            for (i, &t) in times.iter().enumerate() {
                let tt = Tensor::full([b], t as i64, (Kind::Int64, dev));
                let e_c = self.forward(&x, coarse, &on, &tt, obs);
                let e_u = self.forward(&x, coarse, &off, &tt, obs);
                let eps = &e_u + (e_c - &e_u) * cfg.guidance;
                x = ddim_step(&x, &eps, alpha_bar, t, times.get(i + 1).copied()) * mask;
            }
            x
        })
    }
}

/// `sample_steps` evenly spaced timesteps from T−1 down to 0.
fn sample_times(cfg: &DdimConfig) -> Vec<usize> {
    let (n, s) = (cfg.train_steps, cfg.sample_steps);
    (0..s).map(|i| (n - 1) - i * (n - 1) / s.max(1)).collect()
}

/// One deterministic DDIM step (η = 0) from x_t with predicted noise ε to the next timestep
/// (or to x̂₀ after the last one); x̂₀ is clamped to [−1, 1].
fn ddim_step(x: &Tensor, eps: &Tensor, alpha_bar: &[f64], t: usize, t_next: Option<usize>) -> Tensor {
    let ab = alpha_bar[t];
    let x0 = ((x - eps * (1.0 - ab).sqrt()) / ab.sqrt()).clamp(-1.0, 1.0);
    match t_next {
        Some(t_next) => {
            let ab_next = alpha_bar[t_next];
            // Re-derive ε from the clamped x̂₀ so the step stays consistent with it.
            let eps = (x - &x0 * ab.sqrt()) / (1.0 - ab).sqrt();
            &x0 * ab_next.sqrt() + eps * (1.0 - ab_next).sqrt()
        }
        None => x0,
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

/// The normalized observation the denoiser is conditioned on: `global` [B, G], `sites`
/// [B, L, F] and the site `mask` [B, L].
#[derive(Debug, Clone, Copy)]
pub struct ObsTensors<'a> {
    /// Global features.
    pub global: &'a Tensor,
    /// Per-site features.
    pub sites: &'a Tensor,
    /// 1 for a real site, 0 for padding.
    pub mask: &'a Tensor,
}

/// A replay minibatch: executed plans `x0` and PPO's `coarse` plans (encoded in [−1, 1]), the
/// rewards, and the observations they were decided on.
#[derive(Debug)]
pub struct ReplayBatch {
    /// Executed plans [B, L].
    pub x0: Tensor,
    /// Coarse plans [B, L].
    pub coarse: Tensor,
    /// Rewards [B].
    pub rewards: Tensor,
    /// Global features [B, G].
    pub global: Tensor,
    /// Per-site features [B, L, F].
    pub sites: Tensor,
    /// Site mask [B, L].
    pub mask: Tensor,
}

/// One replayed decision: its normalized observation, PPO's coarse plan, the plan the refiner
/// learns to produce (the executed plan, or the oracle's with `target = "oracle"`) and the
/// reward. Plans are encoded in [−1, 1]; a tuple has its own environment's site count.
#[derive(Debug, Clone, Default)]
struct Tuple {
    global: Vec<f32>,
    sites: Vec<f32>,
    coarse: Vec<f32>,
    target: Vec<f32>,
    reward: f32,
}

/// Replay buffer of the DDIM stage: a ring of [`Tuple`]s. Tuples may have different site
/// counts (training on a distribution); a minibatch pads them to its largest and masks the rest.
#[derive(Debug)]
pub struct Replay {
    tuples: Vec<Tuple>,
    capacity: usize,
    /// Tuples held (at most the capacity).
    pub len: usize,
    /// Where the next tuple goes (a ring buffer).
    pub pos: usize,
}

impl Replay {
    /// An empty buffer of `capacity` tuples.
    pub fn new(capacity: usize) -> Self {
        Replay { tuples: Vec::with_capacity(capacity.min(1 << 16)), capacity, len: 0, pos: 0 }
    }

    /// Adds one tuple, overwriting the oldest when full. `sites` holds `coarse.len()` rows.
    pub fn push(&mut self, global: &[f32], sites: &[f32], coarse: &[f32], target: &[f32], reward: f32) {
        let t = Tuple {
            global: global.to_vec(),
            sites: sites.to_vec(),
            coarse: coarse.to_vec(),
            target: target.to_vec(),
            reward,
        };
        if self.pos < self.tuples.len() {
            self.tuples[self.pos] = t;
        } else {
            self.tuples.push(t);
        }
        self.pos = (self.pos + 1) % self.capacity;
        self.len = (self.len + 1).min(self.capacity);
    }

    /// The buffer as named tensors, for a checkpoint: each field concatenated over the tuples
    /// held, with `replay.n_sites` giving each tuple's site count.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        let held = &self.tuples[..self.len.min(self.tuples.len())];
        let cat =
            |f: &dyn Fn(&Tuple) -> &[f32]| -> Vec<f32> { held.iter().flat_map(|t| f(t).iter().copied()).collect() };
        let n_sites: Vec<i64> = held.iter().map(|t| t.coarse.len() as i64).collect();
        let rows: i64 = n_sites.iter().sum();
        vec![
            ("replay.n_sites".into(), Tensor::from_slice(&n_sites)),
            (
                "replay.global".into(),
                Tensor::from_slice(&cat(&|t| &t.global)).view([held.len() as i64, GLOBAL_FEATURES as i64]),
            ),
            ("replay.sites".into(), Tensor::from_slice(&cat(&|t| &t.sites)).view([rows, SITE_FEATURES as i64])),
            ("replay.coarse".into(), Tensor::from_slice(&cat(&|t| &t.coarse))),
            ("replay.executed".into(), Tensor::from_slice(&cat(&|t| &t.target))),
            ("replay.reward".into(), Tensor::from_slice(&held.iter().map(|t| t.reward).collect::<Vec<f32>>())),
        ]
    }

    /// Restores the buffer from a checkpoint's tensors (written by [`Replay::tensors`]).
    pub fn load(&mut self, tensors: &[(String, Tensor)], len: usize, pos: usize) -> Result<(), PolicyError> {
        let find = |name: &str| -> Result<&Tensor, PolicyError> {
            tensors
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t)
                .ok_or_else(|| PolicyError::Checkpoint(format!("`{name}` missing")))
        };
        let get = |name: &str, want: usize| -> Result<Vec<f32>, PolicyError> {
            let v: Vec<f32> = Vec::try_from(find(name)?.flatten(0, -1).to_kind(Kind::Float))
                .map_err(|e: tch::TchError| PolicyError::Checkpoint(e.to_string()))?;
            if v.len() != want {
                return Err(PolicyError::Checkpoint(format!("`{name}` has {} values, expected {want}", v.len())));
            }
            Ok(v)
        };
        let n_sites: Vec<i64> = Vec::try_from(find("replay.n_sites")?.to_kind(Kind::Int64))
            .map_err(|e: tch::TchError| PolicyError::Checkpoint(e.to_string()))?;
        let held = n_sites.len();
        if held > self.capacity || held != len.min(self.capacity) || n_sites.iter().any(|l| !(1..=1 << 20).contains(l))
        {
            return Err(PolicyError::Checkpoint(format!(
                "`replay.n_sites` holds {held} tuples (site counts 1..2^20 each), expected {} of at most {}",
                len.min(self.capacity),
                self.capacity
            )));
        }
        let rows: usize = n_sites.iter().map(|&l| l as usize).sum();
        let global = get("replay.global", held * GLOBAL_FEATURES)?;
        let sites = get("replay.sites", rows * SITE_FEATURES)?;
        let coarse = get("replay.coarse", rows)?;
        let target = get("replay.executed", rows)?;
        let reward = get("replay.reward", held)?;
        let mut row = 0;
        self.tuples = (0..held)
            .map(|i| {
                let l = n_sites[i] as usize;
                let t = Tuple {
                    global: global[i * GLOBAL_FEATURES..(i + 1) * GLOBAL_FEATURES].to_vec(),
                    sites: sites[row * SITE_FEATURES..(row + l) * SITE_FEATURES].to_vec(),
                    coarse: coarse[row..row + l].to_vec(),
                    target: target[row..row + l].to_vec(),
                    reward: reward[i],
                };
                row += l;
                t
            })
            .collect();
        self.len = held;
        self.pos = pos % self.capacity.max(1);
        Ok(())
    }

    /// A minibatch of the tuples at `idx`, on `device`, padded to its largest site count.
    pub fn minibatch(&self, idx: &[usize], device: Device) -> ReplayBatch {
        let picked: Vec<&Tuple> = idx.iter().map(|&i| &self.tuples[i]).collect();
        let (b, l) = (picked.len(), picked.iter().map(|t| t.coarse.len()).max().unwrap_or(1));
        let (mut x0, mut coarse, mut mask) = (vec![0f32; b * l], vec![0f32; b * l], vec![0f32; b * l]);
        let mut sites = vec![0f32; b * l * SITE_FEATURES];
        for (i, t) in picked.iter().enumerate() {
            let m = t.coarse.len();
            x0[i * l..i * l + m].copy_from_slice(&t.target);
            coarse[i * l..i * l + m].copy_from_slice(&t.coarse);
            mask[i * l..i * l + m].iter_mut().for_each(|x| *x = 1.0);
            sites[i * l * SITE_FEATURES..(i * l + m) * SITE_FEATURES].copy_from_slice(&t.sites);
        }
        let global: Vec<f32> = picked.iter().flat_map(|t| t.global.iter().copied()).collect();
        let (bi, li) = (b as i64, l as i64);
        ReplayBatch {
            x0: Tensor::from_slice(&x0).view([bi, li]).to_device(device),
            coarse: Tensor::from_slice(&coarse).view([bi, li]).to_device(device),
            rewards: Tensor::from_slice(&picked.iter().map(|t| t.reward).collect::<Vec<f32>>()).to_device(device),
            global: Tensor::from_slice(&global).view([bi, GLOBAL_FEATURES as i64]).to_device(device),
            sites: Tensor::from_slice(&sites).view([bi, li, SITE_FEATURES as i64]).to_device(device),
            mask: Tensor::from_slice(&mask).view([bi, li]).to_device(device),
        }
    }
}

/// One alternating DDIM stage update: `cfg.updates_per_iteration` reward-weighted denoising
/// steps on minibatches drawn from `replay`, once it holds `cfg.warmup` tuples. Returns the mean
/// loss (NaN before the warm-up; the first non-finite loss, without stepping, if one occurs).
pub fn update(
    den: &Denoiser,
    opt: &mut Adam,
    replay: &Replay,
    cfg: &DdimConfig,
    alpha_bar: &[f64],
    rng: &mut ChaCha8Rng,
    dev: Device,
) -> f64 {
    if replay.len < cfg.warmup {
        return f64::NAN;
    }
    let ab = Tensor::from_slice(alpha_bar).to_kind(Kind::Float).to_device(dev);
    let mut total = 0.0;
    for _ in 0..cfg.updates_per_iteration {
        let idx: Vec<usize> = (0..cfg.batch_size).map(|_| rng.random_range(0..replay.len)).collect();
        let loss = den.loss(cfg, &ab, &replay.minibatch(&idx, dev), rng);
        let v = loss.double_value(&[]);
        if !v.is_finite() {
            return v;
        }
        opt.zero_grad();
        loss.backward();
        opt.clip_grad_norm(1.0);
        opt.step();
        total += v;
    }
    total / cfg.updates_per_iteration.max(1) as f64
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
        let den = Denoiser::new(&vs.root(), 1, 1, cfg.hidden, cfg.activation);
        let mut opt = nn::OptimizerConfig::build(nn::Adam::default(), &vs, 3e-3).unwrap();
        let ab_vec = alpha_bar(&cfg);
        let ab = Tensor::from_slice(&ab_vec).to_kind(Kind::Float);
        let (b, l) = (64, 4);
        for _ in 0..400 {
            let idx: Vec<f32> = (0..b * l).map(|_| encode(rng.random_range(0..8), 8)).collect();
            let x0 = Tensor::from_slice(&idx).view([b, l]);
            let batch = ReplayBatch {
                x0: x0.shallow_clone(),
                coarse: x0.shallow_clone(),
                rewards: Tensor::zeros([b], (Kind::Float, Device::Cpu)),
                global: Tensor::zeros([b, 1], (Kind::Float, Device::Cpu)),
                sites: Tensor::zeros([b, l, 1], (Kind::Float, Device::Cpu)),
                mask: Tensor::ones([b, l], (Kind::Float, Device::Cpu)),
            };
            let loss = den.loss(&cfg, &ab, &batch, &mut rng);
            opt.backward_step(&loss);
        }
        let target: Vec<f32> = (0..8).map(|k| encode(k % 8, 8)).collect();
        let coarse = Tensor::from_slice(&target).view([2, 4]);
        let (global, sites) =
            (Tensor::zeros([2, 1], (Kind::Float, Device::Cpu)), Tensor::zeros([2, 4, 1], (Kind::Float, Device::Cpu)));
        let mask = Tensor::ones([2, 4], (Kind::Float, Device::Cpu));
        let x =
            den.sample(&cfg, &ab_vec, &coarse, ObsTensors { global: &global, sites: &sites, mask: &mask }, &mut rng);
        let got: Vec<f32> = Vec::try_from(x.flatten(0, -1)).unwrap();
        let hits = got.iter().zip(&target).filter(|(g, t)| decode(**g, 8) == decode(**t, 8)).count();
        assert!(hits >= 6, "denoiser reproduced {hits}/8 ranks: {got:?}");
    }

    #[test]
    fn fast_sampling_is_the_reference_loop_rearranged() {
        // Untrained weights (nonzero everywhere), real feature widths, padded sites, guidance
        // on: the split first layer and the batched passes must give the reference's x̂₀, with
        // either activation.
        for activation in [DdimActivation::Mish, DdimActivation::Silu] {
            let vs = nn::VarStore::new(Device::Cpu);
            let (g, f) = (GLOBAL_FEATURES as i64, SITE_FEATURES as i64);
            let den = Denoiser::new(&vs.root(), g, f, 32, activation);
            let cfg = DdimConfig { sample_steps: 10, guidance: 1.5, activation, ..Default::default() };
            let ab = alpha_bar(&cfg);
            let (b, l) = (3, 7);
            let opts = (Kind::Float, Device::Cpu);
            let mut rng = ChaCha8Rng::seed_from_u64(4);
            let global = gaussian(&mut rng, &[b, g], Device::Cpu);
            let sites = gaussian(&mut rng, &[b, l, f], Device::Cpu);
            let coarse = gaussian(&mut rng, &[b, l], Device::Cpu).clamp(-1.0, 1.0);
            let mask = Tensor::ones([b, l], opts);
            let _ = mask.narrow(1, 5, 2).fill_(0.0);
            let obs = ObsTensors { global: &global, sites: &sites, mask: &mask };
            let fast = den.sample(&cfg, &ab, &coarse, obs, &mut ChaCha8Rng::seed_from_u64(9));
            let slow = den.sample_reference(&cfg, &ab, &coarse, obs, &mut ChaCha8Rng::seed_from_u64(9));
            let diff = (&fast - &slow).abs().max().double_value(&[]);
            assert!(diff < 1e-4, "{activation:?}: fast and reference sampling differ by {diff}");
            assert!(fast.abs().sum(Kind::Float).double_value(&[]) > 0.1, "{activation:?}: a trivial output");
        }
    }

    #[test]
    fn the_activation_is_the_configured_one() {
        // The same weights under the two activations give different ε̂: the key is not ignored.
        let (g, f) = (GLOBAL_FEATURES as i64, SITE_FEATURES as i64);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (b, l) = (2, 5);
        let global = gaussian(&mut rng, &[b, g], Device::Cpu);
        let sites = gaussian(&mut rng, &[b, l, f], Device::Cpu);
        let x_t = gaussian(&mut rng, &[b, l], Device::Cpu);
        let mask = Tensor::ones([b, l], (Kind::Float, Device::Cpu));
        let cond = Tensor::ones([b], (Kind::Float, Device::Cpu));
        let t = Tensor::from_slice(&[3i64, 700]);
        let vs = nn::VarStore::new(Device::Cpu);
        let mish = Denoiser::new(&vs.root(), g, f, 16, DdimActivation::Mish);
        let mut vs_silu = nn::VarStore::new(Device::Cpu);
        let silu = Denoiser::new(&vs_silu.root(), g, f, 16, DdimActivation::Silu);
        vs_silu.copy(&vs).unwrap();
        let obs = ObsTensors { global: &global, sites: &sites, mask: &mask };
        let (a, b) = (mish.forward(&x_t, &x_t, &cond, &t, obs), silu.forward(&x_t, &x_t, &cond, &t, obs));
        assert!((a - b).abs().max().double_value(&[]) > 1e-4);
    }
}
