//! Proximal Policy Optimization for per-site rank decisions, every detail in one place.
//!
//! Follows CleanRL's `ppo.py` / SB3's PPO, with names from the PPO paper (Schulman et al. 2017)
//! and GAE (Schulman et al. 2016):
//!
//! - rollouts of `num_steps` rounds from `num_envs` environments stepped together;
//! - GAE(λ) advantages, returns = advantages + values ([`gae`]);
//! - `update_epochs` passes over the rollout in `num_minibatches` minibatches drawn without
//!   replacement (a fresh permutation per epoch);
//! - per-minibatch advantage normalization;
//! - the clipped surrogate `−min(ρ·Â, clip(ρ, 1±ε)·Â)`;
//! - the clipped value loss `½·max((V−R)², (V_old + clip(V−V_old, ±ε) − R)²)`;
//! - an entropy bonus, global gradient-norm clipping, linear learning-rate annealing;
//! - approximate-KL early stop: `mean((ρ−1) − log ρ) > target_kl` ends the epoch loop;
//! - non-finite losses or gradients stop the update and restore the weights from before it.
//!
//! **Factorized actions.** An action is one rank per site, each from its own categorical
//! distribution. The ratio is taken per site, ρ_i = π(a_i|s)/π_old(a_i|s), clipped per site and
//! averaged over the sites; clipping per site keeps a 224-site plan from turning into one huge
//! joint ratio that is clipped almost always.
//!
//! **Credit** ([`Credit`]). The environments' reward is a sum of per-site terms (each site's
//! weighted residual loss and its share of the resource cost) plus nothing else, so each site can
//! be credited with its own reward stream: per-site GAE with per-site values V_i(s), as in
//! multi-agent PPO with individual rewards. With `shared` credit every site gets the state's
//! advantage from the total reward and V(s) = Σ_i V_i(s); at ρ = 1 that is the joint policy
//! gradient divided by the number of sites. Per-site credit removes the other sites' noise from
//! each site's advantage, which is what makes 56–224 simultaneous choices learnable from one
//! scalar reward per round (see the README's comparison).
//!
//! **Skipping** (a network with a skip head). The action is then (skip, ranks): a Bernoulli
//! skip decision per state, and the ranks only when the round is played. log π(a|s) =
//! log π(skip|s) + (1 − skip)·Σ_i log π(a_i|s). The skip decision gets its own clipped
//! surrogate with the state's advantage (the sum of the sites' advantages, normalized per
//! minibatch), averaged over states and added to the sites' loss; in a skipped state the sites'
//! terms are masked out, since no rank was chosen there. Its entropy joins the bonus.
//!
//! **Privileged teacher** (`teacher_coef` > 0; off by default). The simulator's oracle knows
//! the hidden state and solves each round exactly. With a teacher, every rollout state also
//! stores the oracle's decision in that state (DAgger's labelling: the states are the ones the
//! policy itself visits, so the student learns to recover from its own mistakes), and the loss
//! adds `c_T · CE(π(·|s), a*)`: each site's cross-entropy to the oracle's rank, plus the skip
//! Bernoulli's to the oracle's skip where skipping is allowed. c_T decays linearly to 0 over
//! the first `teacher_decay` of the run, after which PPO's own objective is all that is left.
//! The sampled actions and their probabilities are untouched: the term only pulls the
//! parameters, so PPO's ratio stays that of the executed plan. The student sees only its
//! observations; the oracle's privilege is in the labels, as in teacher–student training of
//! policies that act under partial observability. With `teacher_targets = "skip"` the teacher
//! teaches only the skip decision, and the ranks are left to the prior and PPO.
//!
//! **Anchor to the prior** (`prior_kl_coef` = β > 0; off by default). With a model-based prior
//! the loss adds `β · KL(π(·|s) ‖ π_prior(·|s))`, where π_prior is the policy with the residual
//! at zero and the same temperature, per site on the unpriced categoricals (the skip decision
//! is left free). It is the KL-to-reference term of KL-regularized RL. On
//! a distribution of environments one network serves all of them, and where the reward barely
//! separates plans (parameter budgets) the residual otherwise drifts with what the other
//! environments teach the shared weights; the anchor pulls it back to the prior there.
//!
//! **Reference rollout** (`reference_rollout`; off by default). The trainer steps a twin of every
//! environment on the same random stream, played greedily by the untrained policy, and hands PPO
//! the rewards minus the twin's. The twin never sees the learner's actions, so this is a baseline
//! that depends on the episode's exogenous draws only (an input-dependent baseline): GAE, the
//! critic and the loss below are unchanged, they just see relative rewards.
//!
//! **Rewards per gap** (`reward_per_gap`; off by default). On a distribution the environments'
//! returns differ in scale: what the oracle gains over uniform ranks is 0.26 return per episode
//! on one draw of the test suite and 5.8 on another. PPO maximizes the summed return, so it
//! trades a small loss on a small-gap environment for any larger gain elsewhere, while the
//! figure of merit, mean gap closed, weights every environment alike. With this option each
//! environment's rewards are divided by its own gap, measured when it is drawn (the oracle's
//! minus uniform's mean return over a few episodes of its own stream), so the summed return
//! PPO maximizes is the gap closed: the per-task reward normalization of multi-task RL (Hessel
//! et al. 2019, PopArt), with the gap as the task's scale.
//!
//! **Vine skip advantage** (`skip_vine`; off by default). The skip decision's advantage is
//! otherwise the sum of the sites' GAE advantages: the noisiest signal PPO gets, and the one the
//! training seeds disagree on (the README's session 38 diagnosis). With this option the trainer
//! branches each group of environments at `skip_vine` random rounds per episode, as TRPO's
//! vine rollouts do (Schulman et al. 2015, §5.2): two copies of the environments (same state,
//! same random stream, so both face the same exogenous draws) play that round once skipping and
//! once playing the greedy plan, then both follow the current policy's greedy decisions to the
//! end of the episode. The difference of their discounted returns, D = Q(s, skip) − Q(s, play),
//! has none of the rank sampling's noise and none of the draw's. For a Bernoulli decision
//! taken with probability π(a|s) the advantage of the taken action is then
//! A(s, a) = (1 − π(a|s)) · (Q(s, a) − Q(s, ā)) ([`vine_advantage`]), whose expectation over a
//! gives the all-action gradient D·∇P(skip). Only branched states train the skip head; the
//! ranks keep their per-site GAE advantages. The branches cost about one more episode of
//! greedy play per episode.
//!
//! **Deferring to the prior** (`net.defer`, on the same branches). A residual that helps on
//! average can still lose to its prior in part of the distribution (the README's session 40:
//! the shipped residual overspent parameter budgets). With a defer head a third copy plays the
//! prior alone's decision (its skip rule, its plan) before the same greedy continuation, so
//! Δ = Q(s, prior) − Q(s, learned) is measured on the same draws as the skip branches, in the
//! units of the rewards PPO sees (divided by the environment's gap only with `reward_per_gap`;
//! dividing it always was measured and did not help, README session 41). The head
//! is then a classifier of the better of the two decisions, trained by cost-sensitive logistic
//! regression ([`defer_update`]): target 1[Δ > 0], each state weighted by |Δ|, whose minimizer
//! is the decision with the larger expected return (Zadrozny et al. 2003, cost-proportionate
//! weighting). The greedy policy defers where P(defer | s) > ½; sampling never does, so PPO's
//! ratio is untouched, and the head reads the trunk's context with a stopped gradient.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor, nn};

use crate::adam::Adam;
use crate::network::{DeferHead, NetConfig, PolicyNet};

/// Episodes of oracle and uniform play that measure an environment's gap for
/// [`PpoConfig::reward_per_gap`].
pub const GAP_EPISODES: usize = 4;

/// The smallest gap (return per episode) a reward is divided by, so that an environment where
/// the oracle gains almost nothing does not blow its rewards up (the test suite's smallest gap
/// is 0.26).
pub const GAP_FLOOR: f64 = 0.1;

/// How the reward is credited to the per-site decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Credit {
    /// Each site's advantage comes from its own reward stream and value V_i (default).
    PerSite,
    /// Every site gets the state's advantage from the total reward, V(s) = Σ_i V_i.
    Shared,
}

/// What the privileged teacher's cross-entropy covers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TeacherTargets {
    /// Every site's rank and the skip decision.
    #[default]
    All,
    /// The skip decision alone.
    Skip,
}

/// Every PPO hyperparameter, with the defaults used by the shipped policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PpoConfig {
    /// Environments stepped together (default 32).
    pub num_envs: usize,
    /// Rounds collected per environment per iteration (default 64).
    pub num_steps: usize,
    /// Adam learning rate at the start (default 1e-4).
    pub learning_rate: f64,
    /// Anneal the learning rate linearly to 0 over the run (default true).
    pub anneal_lr: bool,
    /// Adam ε (default 1e-5, as CleanRL/SB3).
    pub adam_eps: f64,
    /// Discount γ (default 0.99).
    pub gamma: f64,
    /// GAE λ (default 0.95).
    pub gae_lambda: f64,
    /// Minibatches per epoch (default 4).
    pub num_minibatches: usize,
    /// Epochs over each rollout (default 4).
    pub update_epochs: usize,
    /// Normalize advantages per minibatch (default true).
    pub norm_adv: bool,
    /// Before that, normalize each episode's advantages on their own (z-score over its rounds
    /// and sites; default false). On a distribution of environments the reward scales differ
    /// by orders of magnitude (a channel's violation costs up to (violation_coef + λ)·cap per
    /// round, a parameter budget's plans differ by a few hundredths), and one minibatch-wide
    /// normalization lets the large-scale episodes decide the gradient alone; per episode,
    /// every draw's decisions weigh alike (the balance PopArt gives multi-task value scales).
    #[serde(default)]
    pub norm_adv_per_episode: bool,
    /// Surrogate clipping ε (default 0.2).
    pub clip_coef: f64,
    /// Clip the value loss with the same ε (default true).
    pub clip_vloss: bool,
    /// Weight of the clipped surrogate, PPO's policy-gradient term (default 1). With 0, and
    /// `ent_coef` = `vf_coef` = 0, what is left is pure imitation of the teacher (DAgger): the
    /// ablation that shows what the reward adds.
    #[serde(default = "default_pg_coef")]
    pub pg_coef: f64,
    /// Entropy bonus coefficient (default 0.01).
    pub ent_coef: f64,
    /// Value loss coefficient (default 0.5).
    pub vf_coef: f64,
    /// Global gradient-norm clip (default 0.5).
    pub max_grad_norm: f64,
    /// Stop the epochs when the approximate KL exceeds this (default 0.02; ≤ 0 disables).
    pub target_kl: f64,
    /// Rewards are multiplied by this before GAE (default 1).
    pub reward_scale: f64,
    /// Per-site or shared credit (default per-site).
    pub credit: Credit,
    /// Weight c_T of the privileged teacher's cross-entropy at the start (default 0: no teacher).
    #[serde(default)]
    pub teacher_coef: f64,
    /// Share of the run over which c_T decays linearly to 0 (default 0.5).
    #[serde(default = "default_teacher_decay")]
    pub teacher_decay: f64,
    /// What the teacher teaches: every site's rank and the skip decision (`all`, default), or
    /// the skip decision alone (`skip`), leaving the ranks to the prior and PPO.
    #[serde(default)]
    pub teacher_targets: TeacherTargets,
    /// Weight β of the anchor KL(π ‖ π_prior) (default 0: none): each site's divergence from the
    /// policy of the prior alone (the residual at zero, same temperature); the skip decision is
    /// not anchored. It holds the residual at the prior's plan where the
    /// reward carries little signal (a parameter budget's plans differ by hundredths), as the
    /// KL-to-reference term of KL-regularized RL. Needs a prior.
    #[serde(default)]
    pub prior_kl_coef: f64,
    /// Anchor the skip decision too (default false): β·KL(Bern(p) ‖ Bern(p_prior)) over the
    /// states where skipping is allowed, p_prior the prior alone's P(skip). Why: the runs that
    /// fell below their prior drifted towards skipping (P(skip) 0.47 → 0.52 on the training-time
    /// evaluation), a decision the rank anchor leaves free.
    #[serde(default)]
    pub prior_kl_skip: bool,
    /// Share of the run, from the start, during which only the critic learns (default 0): the
    /// policy-gradient, entropy, anchor and teacher terms are off, so the policy stays what it
    /// started as (the prior alone, when it has one: the residual's last layer starts at zero and
    /// gets no gradient). Without it the first updates follow advantages from an untrained
    /// critic (explained variance −0.7 to −0.2 over the first five iterations of the `default`
    /// preset), which for a policy that starts good can only move it at random — the critic
    /// warm-up of PPO fine-tuning from a pretrained policy.
    #[serde(default)]
    pub value_warmup: f64,
    /// Measure every reward against a reference rollout (default false). Each training
    /// environment gets a twin on the same random stream (the simulator's draws do not depend on
    /// the actions: common random numbers), played by the untrained policy's greedy plan — the
    /// prior alone, for a policy with a prior — and PPO sees r_t − r_t^ref per site. The
    /// twin's reward depends only on the environment's exogenous inputs (its spectra,
    /// sensitivities, channel and noise draws), never on the learner's actions, so subtracting
    /// it leaves the policy gradient unbiased while it removes the part of the return that the
    /// hidden draw decides: the input-dependent baseline of Mao et al. (ICLR 2019) for
    /// input-driven environments, with a greedy reference rollout as in self-critical training.
    /// Why: on a parameter budget the residual's plans differ from the prior's by hundredths of
    /// return while episodes differ by far more, so the plain advantages there are mostly the
    /// draw's noise, and the residual drifted below its prior on exactly those environments.
    #[serde(default)]
    pub reference_rollout: bool,
    /// Divide each environment's rewards by its oracle-over-uniform return gap (default false):
    /// training then maximizes the gap closed, the figure the suite reports, instead of a sum
    /// dominated by the environments whose returns are largest. The gap is measured on
    /// [`GAP_EPISODES`] episodes of the environment's own stream, never on the training episodes.
    #[serde(default)]
    pub reward_per_gap: bool,
    /// Train the skip decision on vine advantages: the expected number of rounds per episode
    /// branched, each group of environments skipping and playing that round, then greedy to
    /// the end on the same draws (see the module doc). 0 (the default) turns it off; > 0 needs
    /// a skip head.
    #[serde(default)]
    pub skip_vine: f64,
    /// Adam learning rate of the defer head (`net.defer`; default 1e-3, annealed with
    /// `anneal_lr` like PPO's): it learns from scratch on a few hundred branched states per
    /// iteration, so faster than the policy's fine-tuning rate.
    #[serde(default = "default_defer_learning_rate")]
    pub defer_learning_rate: f64,
    /// Network sizes.
    pub net: NetConfig,
}

impl Default for PpoConfig {
    fn default() -> Self {
        PpoConfig {
            num_envs: 32,
            num_steps: 64,
            learning_rate: 1e-4,
            anneal_lr: true,
            adam_eps: 1e-5,
            gamma: 0.99,
            gae_lambda: 0.95,
            num_minibatches: 4,
            update_epochs: 4,
            norm_adv: true,
            norm_adv_per_episode: false,
            clip_coef: 0.2,
            clip_vloss: true,
            pg_coef: default_pg_coef(),
            ent_coef: 0.01,
            vf_coef: 0.5,
            max_grad_norm: 0.5,
            target_kl: 0.02,
            reward_scale: 1.0,
            credit: Credit::PerSite,
            teacher_coef: 0.0,
            teacher_decay: default_teacher_decay(),
            teacher_targets: TeacherTargets::All,
            prior_kl_coef: 0.0,
            prior_kl_skip: false,
            value_warmup: 0.0,
            reference_rollout: false,
            reward_per_gap: false,
            skip_vine: 0.0,
            defer_learning_rate: default_defer_learning_rate(),
            net: NetConfig::default(),
        }
    }
}

fn default_pg_coef() -> f64 {
    1.0
}

fn default_teacher_decay() -> f64 {
    0.5
}

fn default_defer_learning_rate() -> f64 {
    1e-3
}

impl PpoConfig {
    /// The teacher's weight c_T after `progress` (0 → 1) of the run: linear from `teacher_coef`
    /// to 0 at `teacher_decay`.
    pub fn teacher_weight(&self, progress: f64) -> f64 {
        if self.teacher_coef <= 0.0 {
            return 0.0;
        }
        self.teacher_coef * (1.0 - progress / self.teacher_decay).max(0.0)
    }

    /// The configuration of one update after `progress` (0 → 1) of the run: during the critic's
    /// warm-up ([`PpoConfig::value_warmup`]) every term that moves the policy is off.
    pub fn at(&self, progress: f64) -> PpoConfig {
        let mut cfg = self.clone();
        if progress < self.value_warmup {
            cfg.pg_coef = 0.0;
            cfg.ent_coef = 0.0;
            cfg.prior_kl_coef = 0.0;
            cfg.teacher_coef = 0.0;
        }
        cfg
    }
}

impl rankpilot_config::Validate for PpoConfig {
    fn validate(&self, v: &mut rankpilot_config::Violations) {
        v.check((1..=4096).contains(&self.num_envs), "num_envs", self.num_envs, "an integer in [1, 4096]");
        v.check((1..=4096).contains(&self.num_steps), "num_steps", self.num_steps, "an integer in [1, 4096]");
        v.check(
            self.learning_rate > 0.0 && self.learning_rate < 1.0,
            "learning_rate",
            self.learning_rate,
            "a number in (0, 1)",
        );
        v.check(self.adam_eps > 0.0, "adam_eps", self.adam_eps, "a number > 0");
        v.check((0.0..=1.0).contains(&self.gamma), "gamma", self.gamma, "a number in [0, 1]");
        v.check((0.0..=1.0).contains(&self.gae_lambda), "gae_lambda", self.gae_lambda, "a number in [0, 1]");
        v.check(
            self.num_minibatches >= 1 && self.num_minibatches <= self.num_envs * self.num_steps,
            "num_minibatches",
            self.num_minibatches,
            "an integer in [1, num_envs × num_steps]",
        );
        v.check(
            (1..=1000).contains(&self.update_epochs),
            "update_epochs",
            self.update_epochs,
            "an integer in [1, 1000]",
        );
        v.check(self.clip_coef > 0.0, "clip_coef", self.clip_coef, "a number > 0");
        v.check(self.pg_coef >= 0.0, "pg_coef", self.pg_coef, "a number >= 0");
        v.check(self.ent_coef >= 0.0, "ent_coef", self.ent_coef, "a number >= 0");
        v.check(self.vf_coef >= 0.0, "vf_coef", self.vf_coef, "a number >= 0");
        v.check(self.max_grad_norm > 0.0, "max_grad_norm", self.max_grad_norm, "a number > 0");
        v.check(self.reward_scale > 0.0, "reward_scale", self.reward_scale, "a number > 0");
        v.check(self.teacher_coef >= 0.0, "teacher_coef", self.teacher_coef, "a number >= 0");
        v.check(
            self.teacher_decay > 0.0 && self.teacher_decay <= 1.0,
            "teacher_decay",
            self.teacher_decay,
            "a number in (0, 1]",
        );
        v.check(self.prior_kl_coef >= 0.0, "prior_kl_coef", self.prior_kl_coef, "a number >= 0");
        v.check((0.0..1.0).contains(&self.value_warmup), "value_warmup", self.value_warmup, "a number in [0, 1)");
        v.check((1..=4096).contains(&self.net.hidden), "net.hidden", self.net.hidden, "an integer in [1, 4096]");
    }
}

/// Generalized advantage estimation over a `[T, N]` rollout (row-major, step-major).
///
/// `terminated[t·N + n]` is 1 when environment n's episode ended with the transition at step t
/// Normalizes advantages per episode ([`PpoConfig::norm_adv_per_episode`]): `adv` holds
/// `width` entries per record (sites, or one per state), `episode[i]` is record i's episode
/// and `weight` is 1 for real entries and 0 for padding (same layout as `adv`). Each episode's
/// real entries get mean 0 and standard deviation 1; an episode with fewer than two real
/// entries, or none spread, is only centred.
pub fn normalize_per_episode(adv: &mut [f32], weight: &[f32], episode: &[usize], width: usize) {
    let n_ep = episode.iter().max().map_or(0, |&m| m + 1);
    let (mut sum, mut sq, mut cnt) = (vec![0f64; n_ep], vec![0f64; n_ep], vec![0f64; n_ep]);
    for (i, &e) in episode.iter().enumerate() {
        for j in i * width..(i + 1) * width {
            let w = weight[j] as f64;
            sum[e] += w * adv[j] as f64;
            sq[e] += w * (adv[j] as f64).powi(2);
            cnt[e] += w;
        }
    }
    let stats: Vec<(f64, f64)> = (0..n_ep)
        .map(|e| {
            let m = sum[e] / cnt[e].max(1.0);
            let var = if cnt[e] > 1.0 { (sq[e] - cnt[e] * m * m).max(0.0) / (cnt[e] - 1.0) } else { 0.0 };
            (m, if var > 0.0 { var.sqrt() } else { 1.0 })
        })
        .collect();
    for (i, &e) in episode.iter().enumerate() {
        let (m, sd) = stats[e];
        for j in i * width..(i + 1) * width {
            adv[j] = (weight[j] as f64 * (adv[j] as f64 - m) / (sd + 1e-8)) as f32;
        }
    }
}

/// (the observation at t+1 is then a fresh episode's). `next_value[n]` is V(s_T) for the
/// observation after the last step. Returns (advantages, returns) with returns = A + V.
pub fn gae(
    rewards: &[f32],
    values: &[f32],
    terminated: &[f32],
    next_value: &[f32],
    num_envs: usize,
    gamma: f64,
    lambda: f64,
) -> (Vec<f32>, Vec<f32>) {
    let t_len = rewards.len() / num_envs;
    let mut adv = vec![0f32; rewards.len()];
    for n in 0..num_envs {
        let mut last = 0f64;
        for t in (0..t_len).rev() {
            let i = t * num_envs + n;
            let not_done = 1.0 - terminated[i] as f64;
            let v_next = if t + 1 == t_len { next_value[n] } else { values[i + num_envs] } as f64;
            let delta = rewards[i] as f64 + gamma * v_next * not_done - values[i] as f64;
            last = delta + gamma * lambda * not_done * last;
            adv[i] = last as f32;
        }
    }
    let ret = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, ret)
}

/// One rollout, flattened to `B = num_steps × num_envs` states, ready for [`update`].
#[derive(Debug)]
pub struct Batch {
    /// Normalized global features [B, G].
    pub global: Tensor,
    /// Normalized site features [B, L, F].
    pub sites: Tensor,
    /// Real-site mask [B, L] (float).
    pub mask: Tensor,
    /// Sampled rank indices [B, L] (int64).
    pub actions: Tensor,
    /// Log-probabilities of the sampled ranks under the rollout policy [B, L].
    pub logp: Tensor,
    /// Values under the rollout policy: [B, L] per site, or [B] state values with shared credit.
    pub values: Tensor,
    /// GAE advantages, same shape as `values`.
    pub advantages: Tensor,
    /// Returns, same shape as `values`.
    pub returns: Tensor,
    /// The prior's utilities the decisions saw [B, L, K], when the policy has a prior.
    pub prior: Option<Tensor>,
    /// Which ranks fitted the budget when each site was allocated [B, L, K] (bool), as the
    /// sampler stored them (`model::sample_plan`); `None` means every rank was allowed.
    pub feasible: Option<Tensor>,
    /// The budget's price μ·cost subtracted from the logits when sampling [B, L, K]
    /// (`model::budget_price`), with `feasible`.
    pub offset: Option<Tensor>,
    /// Skip decisions, when the network has a skip head.
    pub skip: Option<SkipBatch>,
    /// Each site's current rank index [B, L] (int64), with `net.hold` or `net.keep`.
    pub current: Option<Tensor>,
    /// Each rank's relative cost κ [B, L, K] (`model::rank_costs`), with `net.price`.
    pub rank_costs: Option<Tensor>,
    /// The privileged teacher's decisions in the same states, with `teacher_coef` > 0.
    pub teacher: Option<TeacherBatch>,
}

/// The privileged oracle's decisions in a rollout's states (see the module docs).
#[derive(Debug)]
pub struct TeacherBatch {
    /// The oracle's rank index per site [B, L] (int64): the plan it would play.
    pub ranks: Tensor,
    /// 1 where the oracle skips the round [B] (float); read only with a skip head.
    pub skip: Tensor,
    /// This rollout's weight c_T ([`PpoConfig::teacher_weight`]).
    pub weight: f64,
}

/// The skip decisions of a rollout.
#[derive(Debug)]
pub struct SkipBatch {
    /// Decisions [B] (float, 1 = skipped).
    pub taken: Tensor,
    /// Their log-probabilities under the rollout policy [B].
    pub logp: Tensor,
    /// The prior's skip margins the decisions saw [B], when the policy has a prior.
    pub margin: Option<Tensor>,
    /// 1 where the resource allowed skipping [B] (float): elsewhere the head was masked, the
    /// decision was not the policy's, and it takes no gradient.
    pub allowed: Tensor,
    /// With [`PpoConfig::skip_vine`]: (the vine advantage of each taken decision [B], 1 where the
    /// state was branched [B]); the skip loss then covers the branched states alone.
    pub vine: Option<(Tensor, Tensor)>,
}

/// The advantage of a Bernoulli decision taken with probability `p_taken`, from both actions'
/// values measured on the same draws: A(s, a) = Q(s, a) − V(s) with
/// V(s) = π(a)·Q(s, a) + (1 − π(a))·Q(s, ā), i.e. (1 − π(a)) · (Q(s, a) − Q(s, ā)).
pub fn vine_advantage(p_taken: f64, q_taken: f64, q_other: f64) -> f64 {
    (1.0 - p_taken) * (q_taken - q_other)
}

/// The defer head's loss on a batch: logistic regression of 1[Δ > 0] on the logits `z` [B],
/// each state weighted by |Δ| ([`DeferBatch::delta`]), normalized by the weights' sum. Its
/// expected value is smallest where σ(z) > ½ exactly when deferring returns more on average.
/// `None` when every Δ is 0 (the two decisions agreed everywhere: nothing to learn).
pub fn defer_loss(z: &Tensor, delta: &Tensor) -> Option<Tensor> {
    let w = delta.abs();
    let total = w.sum(Kind::Float).double_value(&[]);
    (total > 0.0).then(|| {
        let y = delta.gt(0.0).to_kind(Kind::Float);
        ((z.softplus() - y * z) * w).sum(Kind::Float) / total
    })
}

/// The branched states of a rollout, for the defer head ([`defer_update`]).
#[derive(Debug)]
pub struct DeferBatch {
    /// The states' context [B, 3H] under the current network ([`crate::network::NetOutput::context`]).
    pub context: Tensor,
    /// [`crate::network::DeferInputs::row`] per state [B, 4].
    pub inputs: Tensor,
    /// Q(s, prior) − Q(s, learned) per state [B], on the same draws.
    pub delta: Tensor,
}

/// Trains the defer head on one rollout's branched states: `update_epochs` epochs of
/// `num_minibatches` minibatches of [`defer_loss`], gradient norm clipped at `max_grad_norm`.
/// Returns the mean loss (NaN when no minibatch had a state to learn from).
pub fn defer_update(
    cfg: &PpoConfig,
    head: &DeferHead,
    opt: &mut Adam,
    batch: &DeferBatch,
    learning_rate: f64,
    mut perm: impl FnMut(usize) -> Vec<i64>,
) -> f64 {
    let b = batch.delta.size()[0] as usize;
    let mb = (b / cfg.num_minibatches).max(1);
    opt.lr = learning_rate;
    let (mut sum, mut n) = (0.0, 0usize);
    for _ in 0..cfg.update_epochs {
        for chunk in perm(b).chunks(mb) {
            let idx = Tensor::from_slice(chunk).to_device(batch.delta.device());
            let sel = |t: &Tensor| t.index_select(0, &idx);
            let z = head.logit(&sel(&batch.context), &sel(&batch.inputs));
            let Some(loss) = defer_loss(&z, &sel(&batch.delta)) else { continue };
            let value = loss.double_value(&[]);
            if !value.is_finite() {
                continue;
            }
            opt.zero_grad();
            loss.backward();
            if !opt.grads_finite() {
                opt.zero_grad();
                continue;
            }
            opt.clip_grad_norm(cfg.max_grad_norm);
            opt.step();
            sum += value;
            n += 1;
        }
    }
    if n > 0 { sum / n as f64 } else { f64::NAN }
}

/// What one update did, for logging.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UpdateStats {
    /// Mean clipped-surrogate loss.
    pub policy_loss: f64,
    /// Mean (clipped) value loss.
    pub value_loss: f64,
    /// Mean per-site entropy (nats).
    pub entropy: f64,
    /// Approximate KL `mean((ρ−1) − log ρ)` of the last minibatch.
    pub approx_kl: f64,
    /// Share of per-site ratios outside 1 ± ε.
    pub clip_fraction: f64,
    /// Mean P(skip) over the rollout's states under the updated policy (0 without a skip head).
    #[serde(default)]
    pub skip_prob: f64,
    /// Mean teacher cross-entropy per site (nats; 0 without a teacher).
    #[serde(default)]
    pub teacher_loss: f64,
    /// Mean anchor KL(π ‖ π_prior) per site (nats; 0 without the anchor,
    /// [`PpoConfig::prior_kl_coef`]).
    #[serde(default)]
    pub prior_kl: f64,
    /// 1 − Var(R − V)/Var(R) of the rollout's values.
    pub explained_variance: f64,
    /// Epochs completed (fewer than configured after a KL early stop).
    pub epochs: usize,
    /// The learning rate used.
    pub learning_rate: f64,
    /// True when a non-finite loss or gradient stopped the update (weights restored).
    pub non_finite: bool,
}

/// What the current network says about a minibatch of stored decisions.
pub struct Evaluated {
    /// Log-probabilities of the stored ranks [B, L].
    pub logp: Tensor,
    /// Per-site entropies [B, L].
    pub entropy: Tensor,
    /// Per-site values [B, L].
    pub values: Tensor,
    /// With a skip head: the stored skip decisions' log-probabilities [B], the Bernoulli's
    /// entropy [B] and P(skip) [B].
    pub skip: Option<(Tensor, Tensor, Tensor)>,
    /// Each site's log-probabilities over the ranks before the budget's mask and price
    /// [B, L, K]: the policy's own preference, which the teacher's cross-entropy pulls.
    pub logp_unpriced: Tensor,
    /// The skip head's logit [B] (the policy's, after the prior's margin), with a skip head.
    pub skip_logit: Option<Tensor>,
    /// With a prior: the prior-alone policy's unpriced log-probabilities [B, L, K], detached:
    /// the reference of [`PpoConfig::prior_kl_coef`].
    pub prior_reference: Option<Tensor>,
    /// With a prior and a skip head: the prior-alone policy's skip logit [B], detached (the
    /// reference of [`PpoConfig::prior_kl_skip`]).
    pub prior_skip_logit: Option<Tensor>,
}

/// What a rollout stored about its decisions, as [`evaluate_actions`] reads it.
#[derive(Clone, Copy)]
pub struct Stored<'a> {
    /// Rank indices [B, L] (int64).
    pub actions: &'a Tensor,
    /// The prior's utilities [B, L, K], when the policy has a prior.
    pub prior: Option<&'a Tensor>,
    /// (feasibility mask [B, L, K] bool, price offset [B, L, K]) from the sampler.
    pub feasible: Option<(&'a Tensor, &'a Tensor)>,
    /// (skip decisions [B] float, the prior's skip margins [B]), with a skip head.
    pub skip: Option<(&'a Tensor, Option<&'a Tensor>)>,
    /// Each site's current rank index [B, L] (int64), with `net.hold` or `net.keep`.
    pub current: Option<&'a Tensor>,
    /// Each rank's relative cost κ [B, L, K], with `net.price`.
    pub rank_costs: Option<&'a Tensor>,
}

/// Log-probabilities, entropies and per-site values of `actions` under the current network (and
/// the prior's utilities `prior` [B, L, K], when it has one), each site's categorical restricted
/// to its feasibility mask and priced by the budget, `feasible` = (mask [B, L, K] bool, price
/// offset [B, L, K]) as the sampler stored them, when given; with a skip head also the
/// log-probabilities of the skip decisions `skip` [B] (float, 1 = skipped), with the prior's
/// skip margins [B] when it has a prior.
pub fn evaluate_actions(
    net: &PolicyNet,
    global: &Tensor,
    sites: &Tensor,
    mask: &Tensor,
    stored: Stored<'_>,
) -> Evaluated {
    let Stored { actions, prior, feasible, skip, current, rank_costs } = stored;
    let out = net.forward(global, sites, mask);
    let prior_reference = prior.map(|u| net.prior_alone(u).log_softmax(-1, Kind::Float));
    let mut logits = net.priced(net.policy_logits(&out.logits, prior, current), out.price_logit.as_ref(), rank_costs);
    // With `net.keep` the stored action was drawn from the keep mixture: its probability is that.
    if let Some(q) = net.keep_mixture(&logits, current) {
        logits = q;
    }
    let logp_unpriced = logits.log_softmax(-1, Kind::Float);
    if let Some((f, offset)) = feasible {
        logits -= offset;
        // Ranks that did not fit get probability 0 (exp(−1e9) underflows to 0 exactly, and
        // 0·(−1e9) keeps the entropy finite where −∞ would make it NaN).
        logits = logits.masked_fill(&f.logical_not(), -1e9);
    }
    let logp_all = logits.log_softmax(-1, Kind::Float);
    let logp = logp_all.gather(-1, &actions.unsqueeze(-1), false).squeeze_dim(-1);
    let entropy = -(logp_all.exp() * &logp_all).sum_dim_intlist(-1, false, Kind::Float);
    let mut skip_logit = None;
    let prior_skip_logit = skip.and_then(|(_, margin)| margin).map(|m| net.prior_alone(m));
    let skip = match (out.skip_logit, skip) {
        (Some(z), Some((s, margin))) => {
            let z = net.policy_skip_logit(&z, margin);
            skip_logit = Some(z.shallow_clone());
            // log σ(z) = −softplus(−z), log σ(−z) = −softplus(z).
            let (ls, ln) = (-(-&z).softplus(), -z.softplus());
            let p = z.sigmoid();
            let logp: Tensor = s * &ls + (s.ones_like() - s) * &ln;
            let entropy: Tensor = -(&p * &ls + (p.ones_like() - &p) * &ln);
            Some((logp, entropy, p))
        }
        _ => None,
    };
    Evaluated {
        logp,
        entropy,
        values: out.site_values,
        skip,
        logp_unpriced,
        skip_logit,
        prior_reference,
        prior_skip_logit,
    }
}

/// Runs the PPO epochs on one rollout. `perm` supplies a permutation of `0..B` per epoch (from the
/// trainer's seeded RNG, so runs are reproducible and resumable). On a non-finite loss or gradient
/// the weights in `vs` are restored to their state before the update and `non_finite` is set.
pub fn update(
    cfg: &PpoConfig,
    net: &PolicyNet,
    vs: &nn::VarStore,
    opt: &mut Adam,
    batch: &Batch,
    learning_rate: f64,
    mut perm: impl FnMut(usize) -> Vec<i64>,
) -> UpdateStats {
    let b = batch.values.size()[0] as usize;
    let mb = (b / cfg.num_minibatches).max(1);
    opt.lr = learning_rate;
    let backup: Vec<(String, Tensor)> = vs.variables().into_iter().map(|(k, v)| (k, v.detach().copy())).collect();
    let mut stats = UpdateStats { learning_rate, ..Default::default() };
    let (mut n_mb, mut pl, mut vl, mut ent, mut cf, mut sp, mut tl, mut kls) =
        (0usize, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    'epochs: for _ in 0..cfg.update_epochs {
        let order = perm(b);
        for chunk in order.chunks(mb) {
            let idx = Tensor::from_slice(chunk).to_device(batch.values.device());
            let sel = |t: &Tensor| t.index_select(0, &idx);
            let mask = sel(&batch.mask);
            let prior = batch.prior.as_ref().map(sel);
            let feasible = batch.feasible.as_ref().map(sel);
            let offset = batch.offset.as_ref().map(sel);
            let current = batch.current.as_ref().map(sel);
            let rank_costs = batch.rank_costs.as_ref().map(sel);
            let skip =
                batch.skip.as_ref().map(|b| (sel(&b.taken), sel(&b.logp), b.margin.as_ref().map(sel), sel(&b.allowed)));
            let vine = batch.skip.as_ref().and_then(|b| b.vine.as_ref()).map(|(a, w)| (sel(a), sel(w)));
            let actions = sel(&batch.actions);
            let ev = evaluate_actions(
                net,
                &sel(&batch.global),
                &sel(&batch.sites),
                &mask,
                Stored {
                    actions: &actions,
                    prior: prior.as_ref(),
                    feasible: feasible.as_ref().zip(offset.as_ref()),
                    skip: skip.as_ref().map(|(s, _, m, _)| (s, m.as_ref())),
                    current: current.as_ref(),
                    rank_costs: rank_costs.as_ref(),
                },
            );
            let (logp, entropy, value) = (&ev.logp, &ev.entropy, &ev.values);
            // Sites of a skipped state chose nothing: no ratio, no policy gradient there.
            let act_mask = match &skip {
                Some((s, _, _, _)) => &mask * (s.ones_like() - s).unsqueeze(-1),
                None => mask.shallow_clone(),
            };
            let sites_in_mb = act_mask.sum(Kind::Float).clamp_min(1.0);
            let logratio = (logp - sel(&batch.logp)) * &act_mask;
            let ratio = logratio.exp();

            let (approx_kl, clipped) = tch::no_grad(|| {
                let kl = (((&ratio - 1.0) - &logratio) * &act_mask).sum(Kind::Float) / &sites_in_mb;
                let clipped = (((&ratio - 1.0).abs().gt(cfg.clip_coef)).to_kind(Kind::Float) * &act_mask)
                    .sum(Kind::Float)
                    / &sites_in_mb;
                (kl.double_value(&[]), clipped.double_value(&[]))
            });

            let per_site = batch.advantages.dim() == 2;
            // Per-site tensors are masked; shared ones have one entry per state.
            let weight = if per_site {
                mask.shallow_clone()
            } else {
                Tensor::ones([chunk.len() as i64], (Kind::Float, mask.device()))
            };
            let n_entries = weight.sum(Kind::Float).clamp_min(1.0);
            let mut adv = sel(&batch.advantages);
            if cfg.norm_adv && chunk.len() > 1 {
                let mean = (&adv * &weight).sum(Kind::Float) / &n_entries;
                let var = ((&adv - &mean).square() * &weight).sum(Kind::Float) / (&n_entries - 1.0).clamp_min(1.0);
                adv = (&adv - mean) / (var.sqrt() + 1e-8);
            }
            // The skip decision's advantage is the state's: the sum of the sites' advantages.
            let state_adv = if per_site {
                (sel(&batch.advantages) * &mask).sum_dim_intlist(1, false, Kind::Float)
            } else {
                sel(&batch.advantages)
            };
            let adv = if per_site { adv } else { adv.unsqueeze(-1) };
            let pg1 = -&adv * &ratio;
            let pg2 = -&adv * ratio.clamp(1.0 - cfg.clip_coef, 1.0 + cfg.clip_coef);
            let mut policy_loss = (pg1.maximum(&pg2) * &act_mask).sum(Kind::Float) / &sites_in_mb;
            let mut skip_entropy = Tensor::from(0.0f32);
            if let (Some((logp_s, ent_s, _)), Some((_, old_logp_s, _, allowed))) = (&ev.skip, &skip) {
                // Only states where the resource allowed skipping carry a skip decision.
                let n_allowed = allowed.sum(Kind::Float).clamp_min(1.0);
                let (a, trained) = match &vine {
                    // Vine advantages are centred already (their mean over the action is 0):
                    // scaled to unit RMS over the branched states, not re-centred.
                    Some((a, branched)) => {
                        let w = allowed * branched;
                        let n = w.sum(Kind::Float).clamp_min(1.0);
                        let rms = ((a.square() * &w).sum(Kind::Float) / &n).sqrt();
                        let a = if cfg.norm_adv { a / (rms + 1e-8) } else { a.shallow_clone() };
                        (a, w)
                    }
                    None => {
                        let mut a = state_adv;
                        if cfg.norm_adv && chunk.len() > 1 {
                            let mean = (&a * allowed).sum(Kind::Float) / &n_allowed;
                            let var =
                                ((&a - &mean).square() * allowed).sum(Kind::Float) / (&n_allowed - 1.0).clamp_min(1.0);
                            a = (&a - mean) / (var.sqrt() + 1e-8);
                        }
                        (a, allowed.shallow_clone())
                    }
                };
                let n_trained = trained.sum(Kind::Float).clamp_min(1.0);
                let ratio_s = ((logp_s - old_logp_s) * &trained).exp();
                let l1 = -&a * &ratio_s;
                let l2 = -&a * ratio_s.clamp(1.0 - cfg.clip_coef, 1.0 + cfg.clip_coef);
                policy_loss += (l1.maximum(&l2) * &trained).sum(Kind::Float) / &n_trained;
                skip_entropy = (ent_s * allowed).sum(Kind::Float) / &n_allowed;
            }

            let value = if per_site { value.shallow_clone() } else { value.sum_dim_intlist(1, false, Kind::Float) };
            let returns = sel(&batch.returns);
            let v_unclipped = (&value - &returns).square();
            let value_err = if cfg.clip_vloss {
                let v_old = sel(&batch.values);
                let v_clipped = &v_old + (&value - &v_old).clamp(-cfg.clip_coef, cfg.clip_coef);
                v_unclipped.maximum(&(v_clipped - &returns).square())
            } else {
                v_unclipped
            };
            let value_loss = (value_err * &weight).sum(Kind::Float) / &n_entries * 0.5;
            let entropy_loss = (entropy * &mask).sum(Kind::Float) / mask.sum(Kind::Float).clamp_min(1.0) + skip_entropy;
            let mut loss = &policy_loss * cfg.pg_coef - &entropy_loss * cfg.ent_coef + &value_loss * cfg.vf_coef;
            if let Some(t) = batch.teacher.as_ref().filter(|t| t.weight > 0.0) {
                let rank_mask = match cfg.teacher_targets {
                    TeacherTargets::All => mask.shallow_clone(),
                    TeacherTargets::Skip => mask.zeros_like(),
                };
                let teacher_loss =
                    teacher_cross_entropy(&ev, &sel(&t.ranks), &sel(&t.skip), &rank_mask, skip.as_ref().map(|s| &s.3));
                tl += teacher_loss.double_value(&[]);
                loss += teacher_loss * t.weight;
            }
            if cfg.prior_kl_coef > 0.0
                && let Some(reference) = &ev.prior_reference
            {
                let mut kl = prior_kl(&ev, reference, &mask);
                if cfg.prior_kl_skip
                    && let (Some(z), Some(z0), Some((_, _, _, allowed))) = (&ev.skip_logit, &ev.prior_skip_logit, &skip)
                {
                    kl += skip_kl(z, z0, allowed);
                }
                kls += kl.double_value(&[]);
                loss += kl * cfg.prior_kl_coef;
            }

            let loss_value = loss.double_value(&[]);
            if !loss_value.is_finite() {
                stats.non_finite = true;
                break 'epochs;
            }
            opt.zero_grad();
            loss.backward();
            if !opt.grads_finite() {
                stats.non_finite = true;
                break 'epochs;
            }
            opt.clip_grad_norm(cfg.max_grad_norm);
            opt.step();

            n_mb += 1;
            pl += policy_loss.double_value(&[]);
            vl += value_loss.double_value(&[]);
            ent += entropy_loss.double_value(&[]);
            cf += clipped;
            if let Some((_, _, p)) = &ev.skip {
                sp += p.mean(Kind::Float).double_value(&[]);
            }
            stats.approx_kl = approx_kl;
            if cfg.target_kl > 0.0 && approx_kl > cfg.target_kl {
                stats.epochs += 1;
                break 'epochs;
            }
        }
        stats.epochs += 1;
    }
    if stats.non_finite {
        tch::no_grad(|| {
            let mut vars = vs.variables();
            for (name, saved) in &backup {
                if let Some(v) = vars.get_mut(name) {
                    v.copy_(saved);
                }
            }
        });
        opt.zero_grad();
    }
    let n = n_mb.max(1) as f64;
    stats.policy_loss = pl / n;
    stats.value_loss = vl / n;
    stats.entropy = ent / n;
    stats.clip_fraction = cf / n;
    stats.skip_prob = sp / n;
    stats.teacher_loss = tl / n;
    stats.prior_kl = kls / n;
    stats.explained_variance = explained_variance(&batch.values.flatten(0, -1), &batch.returns.flatten(0, -1));
    stats
}

/// The teacher's cross-entropy: each real site's −log π(a*_i|s) under the policy's unpriced
/// categorical, averaged over the sites, plus (with a skip head) the skip Bernoulli's
/// cross-entropy to the oracle's skip, averaged over the states where skipping is allowed.
pub fn teacher_cross_entropy(
    ev: &Evaluated,
    ranks: &Tensor,
    skip: &Tensor,
    mask: &Tensor,
    skip_allowed: Option<&Tensor>,
) -> Tensor {
    let nll = -ev.logp_unpriced.gather(-1, &ranks.unsqueeze(-1), false).squeeze_dim(-1);
    let mut loss = (nll * mask).sum(Kind::Float) / mask.sum(Kind::Float).clamp_min(1.0);
    if let (Some(z), Some(allowed)) = (&ev.skip_logit, skip_allowed) {
        // −[y·log σ(z) + (1 − y)·log σ(−z)] = softplus(z) − y·z.
        let bce = z.softplus() - skip * z;
        loss += (bce * allowed).sum(Kind::Float) / allowed.sum(Kind::Float).clamp_min(1.0);
    }
    loss
}

/// The anchor KL(π ‖ π_prior): each real site's divergence of the unpriced categorical from the
/// prior-alone one (`reference`, [`Evaluated::prior_reference`]), averaged over the sites. The
/// skip decision is anchored only with [`PpoConfig::prior_kl_skip`] ([`skip_kl`]): it is where the
/// reward (and a skip-only teacher) moves the policy most, and an anchor on it measured several
/// nats against the teacher's pull.
pub fn prior_kl(ev: &Evaluated, reference: &Tensor, mask: &Tensor) -> Tensor {
    let kl_site = (ev.logp_unpriced.exp() * (&ev.logp_unpriced - reference)).sum_dim_intlist(-1, false, Kind::Float);
    (kl_site * mask).sum(Kind::Float) / mask.sum(Kind::Float).clamp_min(1.0)
}

/// KL(Bern(σ(z)) ‖ Bern(σ(z0))) per state, averaged over the states where skipping is
/// `allowed` (the skip half of the anchor, [`PpoConfig::prior_kl_skip`]).
pub fn skip_kl(z: &Tensor, z0: &Tensor, allowed: &Tensor) -> Tensor {
    // log σ(z) = −softplus(−z), log(1 − σ(z)) = −softplus(z).
    let p = z.sigmoid();
    let (ls, ln) = (-(-z).softplus(), -z.softplus());
    let (ls0, ln0) = (-(-z0).softplus(), -z0.softplus());
    let kl = &p * (ls - ls0) + (p.ones_like() - &p) * (ln - ln0);
    (kl * allowed).sum(Kind::Float) / allowed.sum(Kind::Float).clamp_min(1.0)
}

/// 1 − Var(R − V)/Var(R); NaN when the returns have no variance.
pub fn explained_variance(values: &Tensor, returns: &Tensor) -> f64 {
    let var_r = returns.var(false).double_value(&[]);
    if var_r == 0.0 {
        return f64::NAN;
    }
    1.0 - (returns - values).var(false).double_value(&[]) / var_r
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn gae_matches_hand_computation() {
        // One environment, three steps, episode ends after step 1 (index 1).
        let rewards = [1.0, 2.0, 3.0];
        let values = [0.5, 1.0, 1.5];
        let terminated = [0.0, 1.0, 0.0];
        let next_value = [2.0];
        let (g, l) = (0.9f64, 0.8f64);
        let (adv, ret) = gae(&rewards, &values, &terminated, &next_value, 1, g, l);
        // Step 2: δ = 3 + 0.9·2 − 1.5 = 3.3; A₂ = 3.3.
        // Step 1: terminal, δ = 2 − 1 = 1; A₁ = 1.
        // Step 0: δ = 1 + 0.9·1 − 0.5 = 1.4; A₀ = 1.4 + 0.9·0.8·1 = 2.12.
        let want = [2.12f32, 1.0, 3.3];
        for (a, w) in adv.iter().zip(want) {
            assert!((a - w).abs() < 1e-6, "{adv:?}");
        }
        assert!((ret[0] - 2.62).abs() < 1e-6);
    }

    #[test]
    fn per_episode_normalization_gives_every_episode_unit_scale_and_leaves_padding_at_zero() {
        // Two records of 2 sites in episode 0 (scale 100), one of them padded; one in episode 1
        // (scale 0.01).
        let mut adv = vec![100.0, -100.0, 300.0, 7.0, 0.01, 0.03];
        let weight = vec![1.0, 1.0, 1.0, 0.0, 1.0, 1.0];
        normalize_per_episode(&mut adv, &weight, &[0, 0, 1], 2);
        let e0 = [adv[0], adv[1], adv[2]];
        let mean0 = e0.iter().sum::<f32>() / 3.0;
        let sd0 = (e0.iter().map(|x| (x - mean0).powi(2)).sum::<f32>() / 2.0).sqrt();
        assert!(mean0.abs() < 1e-5 && (sd0 - 1.0).abs() < 1e-5, "{adv:?}");
        assert_eq!(adv[3], 0.0);
        assert!(
            (adv[4] + std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-4
                && (adv[5] - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-4,
            "{adv:?}"
        );
    }

    #[test]
    fn gae_keeps_environments_apart() {
        // Two environments interleaved step-major; env 1 has zero reward throughout.
        let rewards = [1.0, 0.0, 1.0, 0.0];
        let values = [0.0; 4];
        let (adv, _) = gae(&rewards, &values, &[0.0; 4], &[0.0, 0.0], 2, 1.0, 1.0);
        assert_eq!(adv, vec![2.0, 0.0, 1.0, 0.0]);
    }

    #[test]
    fn clipped_objective_has_zero_gradient_outside_clip_range() {
        // One site, two ranks. Make the current policy far from the old one in the direction
        // that the advantage favours: the clipped term is flat there, so no policy gradient.
        let logits = Tensor::from_slice(&[2.0f32, 0.0]).set_requires_grad(true);
        let logp_new = logits.log_softmax(-1, Kind::Float).get(0);
        let logp_old = Tensor::from(-2.0f32); // ρ = exp(logp_new + 2) ≈ 7.5 ≫ 1.2
        let ratio = (&logp_new - &logp_old).exp();
        let adv = Tensor::from(1.0f32);
        let eps = 0.2;
        let loss = (-&adv * &ratio).maximum(&(-&adv * ratio.clamp(1.0 - eps, 1.0 + eps)));
        loss.backward();
        let g = logits.grad();
        assert_eq!(g.abs().sum(Kind::Float).double_value(&[]), 0.0);

        // Inside the range the gradient is not zero.
        let logits = Tensor::from_slice(&[0.0f32, 0.0]).set_requires_grad(true);
        let logp_new = logits.log_softmax(-1, Kind::Float).get(0);
        let ratio = (&logp_new - 0.5f64.ln()).exp();
        let loss = (-&adv * &ratio).maximum(&(-&adv * ratio.clamp(1.0 - eps, 1.0 + eps)));
        loss.backward();
        assert!(logits.grad().abs().sum(Kind::Float).double_value(&[]) > 0.1);
    }

    /// A batch of `b` random states with 5 sites and none of the optional parts (prior, skip,
    /// teacher, ...), every site having taken rank index 0.
    fn plain_batch(b: i64, logp: Tensor, values: Tensor, advantages: Tensor, returns: Tensor) -> Batch {
        let opts = (Kind::Float, Device::Cpu);
        Batch {
            global: Tensor::randn([b, 2], opts),
            sites: Tensor::randn([b, 5, 3], opts),
            mask: Tensor::ones([b, 5], opts),
            actions: Tensor::zeros([b, 5], (Kind::Int64, Device::Cpu)),
            logp,
            values,
            advantages,
            returns,
            prior: None,
            feasible: None,
            offset: None,
            skip: None,
            current: None,
            rank_costs: None,
            teacher: None,
        }
    }

    #[test]
    fn update_restores_weights_on_non_finite_loss() {
        tch::manual_seed(1);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = PolicyNet::new(&vs.root(), 2, 3, 4, NetConfig { hidden: 8, skip: false, ..Default::default() });
        let mut opt = Adam::new(&vs, "", 1e-3, 1e-5);
        let before: Vec<f32> = Vec::try_from(vs.variables()["logits.weight"].flatten(0, -1)).unwrap();
        let b = 8;
        let opts = (Kind::Float, Device::Cpu);
        let batch = plain_batch(
            b,
            Tensor::full([b, 5], -1.0, opts),
            Tensor::zeros([b], opts),
            Tensor::ones([b], opts),
            // The first minibatch is fine and takes a step; the second has NaN returns.
            Tensor::from_slice(&[0.0, 0.0, 0.0, 0.0, f32::NAN, f32::NAN, f32::NAN, f32::NAN]),
        );
        let cfg = PpoConfig { num_minibatches: 2, target_kl: 0.0, ..Default::default() };
        let stats = update(&cfg, &net, &vs, &mut opt, &batch, 1e-3, |n| (0..n as i64).collect());
        assert!(stats.non_finite);
        let after: Vec<f32> = Vec::try_from(vs.variables()["logits.weight"].flatten(0, -1)).unwrap();
        assert_eq!(before, after);
    }

    /// A batch of `b` states whose advantages are large and random (returns 1, old values 0).
    fn random_advantage_batch(b: i64) -> Batch {
        let opts = (Kind::Float, Device::Cpu);
        plain_batch(
            b,
            Tensor::full([b, 5], -1.4, opts),
            Tensor::zeros([b, 5], opts),
            Tensor::randn([b, 5], opts) * 3.0,
            Tensor::ones([b, 5], opts),
        )
    }

    #[test]
    fn pg_coef_zero_leaves_no_reward_gradient() {
        // The pure-imitation ablation turns PPO's terms off. Without a teacher nothing may then
        // move the policy, however large the advantages; with pg_coef 1 the same batch does.
        let logits_after = |pg_coef: f64| -> (Vec<f32>, Vec<f32>) {
            tch::manual_seed(2);
            let vs = nn::VarStore::new(Device::Cpu);
            let net = PolicyNet::new(&vs.root(), 2, 3, 4, NetConfig { hidden: 8, skip: false, ..Default::default() });
            let mut opt = Adam::new(&vs, "", 1e-2, 1e-5);
            let before: Vec<f32> = Vec::try_from(vs.variables()["logits.weight"].flatten(0, -1)).unwrap();
            let batch = random_advantage_batch(8);
            let cfg = PpoConfig {
                pg_coef,
                ent_coef: 0.0,
                vf_coef: 0.0,
                num_minibatches: 1,
                target_kl: 0.0,
                ..Default::default()
            };
            let stats = update(&cfg, &net, &vs, &mut opt, &batch, 1e-2, |n| (0..n as i64).collect());
            assert!(!stats.non_finite);
            (before, Vec::try_from(vs.variables()["logits.weight"].flatten(0, -1)).unwrap())
        };
        let (before, after) = logits_after(0.0);
        assert_eq!(before, after, "pg_coef 0 without a teacher moved the policy");
        let (before, after) = logits_after(1.0);
        assert_ne!(before, after, "the control: PPO's surrogate moves it");
    }

    #[test]
    fn value_warmup_trains_the_critic_alone() {
        // During the warm-up the same batch that moves the policy afterwards leaves every policy
        // weight as it was, while the value head learns.
        let run = |progress: f64| -> [bool; 2] {
            tch::manual_seed(3);
            let vs = nn::VarStore::new(Device::Cpu);
            let net = PolicyNet::new(&vs.root(), 2, 3, 4, NetConfig { hidden: 8, skip: false, ..Default::default() });
            let mut opt = Adam::new(&vs, "", 1e-2, 1e-5);
            let weights = |name: &str| -> Vec<f32> { Vec::try_from(vs.variables()[name].flatten(0, -1)).unwrap() };
            let before = [weights("logits.weight"), weights("value2.weight")];
            let batch = random_advantage_batch(8);
            let schedule = PpoConfig { value_warmup: 0.1, num_minibatches: 1, target_kl: 0.0, ..Default::default() };
            let cfg = schedule.at(progress);
            let stats = update(&cfg, &net, &vs, &mut opt, &batch, 1e-2, |n| (0..n as i64).collect());
            assert!(!stats.non_finite);
            [weights("logits.weight") != before[0], weights("value2.weight") != before[1]]
        };
        assert_eq!(run(0.05), [false, true], "in the warm-up: the policy fixed, the critic learning");
        assert_eq!(run(0.1), [true, true], "after it, both learn");
    }

    #[test]
    fn teacher_weight_decays_linearly_to_zero() {
        let cfg = PpoConfig { teacher_coef: 2.0, teacher_decay: 0.5, ..Default::default() };
        assert_eq!(cfg.teacher_weight(0.0), 2.0);
        assert!((cfg.teacher_weight(0.25) - 1.0).abs() < 1e-12);
        assert_eq!(cfg.teacher_weight(0.5), 0.0);
        assert_eq!(cfg.teacher_weight(0.9), 0.0);
        assert_eq!(PpoConfig::default().teacher_weight(0.0), 0.0, "off by default");
    }

    /// A batch in which PPO's own terms give no policy gradient (zero advantages, returns equal
    /// to the values `ev0` gives), every state played with all its sites at rank index 0 and
    /// skipping allowed: whatever moves the policy is an added term (teacher, anchor).
    struct NoRewardBatch<'a> {
        global: &'a Tensor,
        sites: &'a Tensor,
        mask: &'a Tensor,
        actions: &'a Tensor,
        taken: &'a Tensor,
        prior: Option<&'a Tensor>,
        margin: Option<&'a Tensor>,
    }

    impl NoRewardBatch<'_> {
        fn build(&self, ev0: &Evaluated, teacher: Option<TeacherBatch>) -> Batch {
            let values = ev0.values.shallow_clone();
            Batch {
                global: self.global.shallow_clone(),
                sites: self.sites.shallow_clone(),
                mask: self.mask.shallow_clone(),
                actions: self.actions.shallow_clone(),
                logp: ev0.logp.shallow_clone(),
                values: values.shallow_clone(),
                advantages: values.zeros_like(),
                returns: values,
                prior: self.prior.map(Tensor::shallow_clone),
                feasible: None,
                offset: None,
                skip: Some(SkipBatch {
                    taken: self.taken.shallow_clone(),
                    logp: ev0.skip.as_ref().unwrap().0.shallow_clone(),
                    margin: self.margin.map(Tensor::shallow_clone),
                    allowed: self.taken.ones_like(),
                    vine: None,
                }),
                current: None,
                rank_costs: None,
                teacher,
            }
        }

        /// 200 full-batch epochs with no entropy bonus and no early stop.
        fn cfg() -> PpoConfig {
            PpoConfig {
                num_minibatches: 1,
                update_epochs: 200,
                target_kl: 0.0,
                ent_coef: 0.0,
                norm_adv: false,
                ..Default::default()
            }
        }
    }

    /// Trains a fresh network on the teacher's cross-entropy alone (`targets`) and returns the
    /// agreement with the oracle (ranks, skip) before and after, and whether the rank head's
    /// last layer moved. Zero advantages and returns equal to the values: PPO's own terms give
    /// no policy gradient, so whatever moves the policy is the teacher's cross-entropy. The
    /// oracle wants rank index (site mod 4) at site i and skips in the first half of the states.
    fn teach(targets: TeacherTargets) -> ((f64, f64), (f64, f64), bool) {
        tch::manual_seed(5);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = PolicyNet::new(&vs.root(), 2, 3, 4, NetConfig { hidden: 16, skip: true, ..Default::default() });
        let mut opt = Adam::new(&vs, "", 1e-2, 1e-5);
        let (b, l) = (16i64, 5i64);
        let opts = (Kind::Float, Device::Cpu);
        let global = Tensor::randn([b, 2], opts);
        let sites = Tensor::randn([b, l, 3], opts);
        let mask = Tensor::ones([b, l], opts);
        let actions = Tensor::zeros([b, l], (Kind::Int64, Device::Cpu));
        let taken = Tensor::zeros([b], opts);
        let want: Vec<i64> = (0..b * l).map(|i| (i % l) % 4).collect();
        let teacher_ranks = Tensor::from_slice(&want).view([b, l]);
        let teacher_skip = Tensor::from_slice(&(0..b).map(|i| (i < b / 2) as u8 as f32).collect::<Vec<f32>>());
        let evaluate = |net: &PolicyNet| {
            let stored = Stored {
                actions: &actions,
                prior: None,
                feasible: None,
                skip: Some((&taken, None)),
                current: None,
                rank_costs: None,
            };
            tch::no_grad(|| evaluate_actions(net, &global, &sites, &mask, stored))
        };
        let agreement = |ev: &Evaluated| -> (f64, f64) {
            let hit =
                ev.logp_unpriced.argmax(-1, false).eq_tensor(&teacher_ranks).to_kind(Kind::Float).mean(Kind::Float);
            let p = ev.skip_logit.as_ref().unwrap().sigmoid();
            let skip_hit =
                p.gt(0.5).to_kind(Kind::Float).eq_tensor(&teacher_skip).to_kind(Kind::Float).mean(Kind::Float);
            (hit.double_value(&[]), skip_hit.double_value(&[]))
        };
        let head = |vs: &nn::VarStore| -> Vec<f32> {
            let v = vs.variables();
            Vec::try_from(Tensor::cat(&[v["logits.weight"].flatten(0, -1), v["logits.bias"].shallow_clone()], 0))
                .unwrap()
        };
        let head_before = head(&vs);
        let ev0 = evaluate(&net);
        let before = agreement(&ev0);
        let parts = NoRewardBatch {
            global: &global,
            sites: &sites,
            mask: &mask,
            actions: &actions,
            taken: &taken,
            prior: None,
            margin: None,
        };
        let teacher =
            TeacherBatch { ranks: teacher_ranks.shallow_clone(), skip: teacher_skip.shallow_clone(), weight: 1.0 };
        let batch = parts.build(&ev0, Some(teacher));
        let cfg = PpoConfig { teacher_targets: targets, ..NoRewardBatch::cfg() };
        let stats = update(&cfg, &net, &vs, &mut opt, &batch, 1e-2, |n| (0..n as i64).collect());
        assert!(!stats.non_finite && stats.teacher_loss > 0.0);
        let after = agreement(&evaluate(&net));
        (before, after, head(&vs) != head_before)
    }

    #[test]
    fn the_teacher_term_alone_moves_each_site_and_the_skip_head_towards_the_oracle() {
        let (before, after, head_moved) = teach(TeacherTargets::All);
        assert!(after.0 > 0.95 && after.0 > before.0 + 0.3, "ranks: agreement {before:?} -> {after:?}");
        assert!(after.1 > 0.95, "skip: agreement {before:?} -> {after:?}");
        assert!(head_moved);
    }

    #[test]
    fn a_skip_only_teacher_teaches_the_skip_and_leaves_the_rank_head_alone() {
        let (before, after, head_moved) = teach(TeacherTargets::Skip);
        assert!(after.1 > 0.95, "skip: agreement {before:?} -> {after:?}");
        assert!(!head_moved, "the rank head got a gradient from a skip-only teacher");
        assert!(after.0 < 0.95, "ranks: agreement {before:?} -> {after:?}");
    }

    #[test]
    fn the_prior_kl_anchor_pulls_a_moved_residual_back_to_the_prior() {
        let [_, _, skip_before, skip_after] = anchor_alone(false);
        // Without `prior_kl_skip` the skip head gets no gradient of its own.
        assert!(skip_before > 0.05 && skip_after > skip_before / 2.0, "skip KL {skip_before} -> {skip_after}");
    }

    #[test]
    fn the_skip_anchor_pulls_the_skip_decision_back_too() {
        let [_, _, skip_before, skip_after] = anchor_alone(true);
        assert!(skip_before > 0.05 && skip_after < skip_before / 20.0, "skip KL {skip_before} -> {skip_after}");
    }

    /// A residual moved away from zero, and no reward signal (zero advantages, returns equal to
    /// the values, no entropy bonus): the anchor alone must bring each site's categorical back to
    /// the prior's (asserted here), and with `prior_kl_skip` the skip decision too. Returns the
    /// ranks' and the skip decision's KL to the prior, before and after one update.
    fn anchor_alone(prior_kl_skip: bool) -> [f64; 4] {
        tch::manual_seed(7);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = PolicyNet::with_prior(
            &vs.root(),
            2,
            3,
            4,
            NetConfig { hidden: 16, skip: true, ..Default::default() },
            Some((3.0, false, true)),
            None,
        );
        tch::no_grad(|| {
            let mut v = vs.variables();
            for name in ["logits.weight", "logits.bias", "skip.weight", "skip.bias"] {
                let t = v.get_mut(name).unwrap();
                let noise = t.randn_like() * 0.5;
                t.copy_(&noise);
            }
        });
        let mut opt = Adam::new(&vs, "", 1e-2, 1e-5);
        let (b, l) = (16i64, 5i64);
        let opts = (Kind::Float, Device::Cpu);
        let global = Tensor::randn([b, 2], opts);
        let sites = Tensor::randn([b, l, 3], opts);
        let mask = Tensor::ones([b, l], opts);
        let prior = Tensor::randn([b, l, 4], opts);
        let margin = Tensor::randn([b], opts);
        let actions = Tensor::zeros([b, l], (Kind::Int64, Device::Cpu));
        let taken = Tensor::zeros([b], opts);
        let evaluate = |net: &PolicyNet| {
            let stored = Stored {
                actions: &actions,
                prior: Some(&prior),
                feasible: None,
                skip: Some((&taken, Some(&margin))),
                current: None,
                rank_costs: None,
            };
            tch::no_grad(|| evaluate_actions(net, &global, &sites, &mask, stored))
        };
        let kl = |ev: &Evaluated| prior_kl(ev, ev.prior_reference.as_ref().unwrap(), &mask).double_value(&[]);
        let allowed = Tensor::ones([b], opts);
        let kl_skip = |ev: &Evaluated| {
            skip_kl(ev.skip_logit.as_ref().unwrap(), ev.prior_skip_logit.as_ref().unwrap(), &allowed).double_value(&[])
        };
        let ev0 = evaluate(&net);
        let (kl_before, skip_before) = (kl(&ev0), kl_skip(&ev0));
        let parts = NoRewardBatch {
            global: &global,
            sites: &sites,
            mask: &mask,
            actions: &actions,
            taken: &taken,
            prior: Some(&prior),
            margin: Some(&margin),
        };
        let batch = parts.build(&ev0, None);
        let cfg = PpoConfig { prior_kl_coef: 1.0, prior_kl_skip, ..NoRewardBatch::cfg() };
        let stats = update(&cfg, &net, &vs, &mut opt, &batch, 1e-2, |n| (0..n as i64).collect());
        assert!(!stats.non_finite && stats.prior_kl > 0.0);
        let ev = evaluate(&net);
        let kl_after = kl(&ev);
        assert!(kl_before > 0.05 && kl_after < kl_before / 20.0, "KL to the prior {kl_before} -> {kl_after}");
        let prior_logp = ev.prior_reference.as_ref().unwrap();
        let same_mode = ev.logp_unpriced.argmax(-1, false).eq_tensor(&prior_logp.argmax(-1, false));
        assert!(same_mode.to_kind(Kind::Float).mean(Kind::Float).double_value(&[]) > 0.95);
        [kl_before, kl_after, skip_before, kl_skip(&ev)]
    }

    #[test]
    fn skip_decision_follows_its_advantage() {
        // Half the states skipped, half played. When skipping did better than expected (and
        // playing worse), the update raises P(skip); with the signs flipped it lowers it.
        let (p0, up) = skip_update(1.0, None);
        let (q0, down) = skip_update(-1.0, None);
        // Each run is judged against its own start: other tests share libtorch's global
        // generator, so two seeded starts need not be equal when tests run in parallel.
        assert!(up > p0 + 0.01, "skipping paid: P(skip) {p0} -> {up}");
        assert!(down < q0 - 0.01, "skipping cost: P(skip) {q0} -> {down}");
    }

    #[test]
    fn with_vine_advantages_the_skip_decision_follows_the_branches_not_the_sites() {
        // The sites' advantages say skipping paid; the branches say it cost (and the reverse):
        // with `skip_vine` the skip head follows the branches.
        let (p0, down) = skip_update(1.0, Some(-1.0));
        let (q0, up) = skip_update(-1.0, Some(1.0));
        assert!(down < p0 - 0.01, "the branches said skipping cost: P(skip) {p0} -> {down}");
        assert!(up > q0 + 0.01, "the branches said skipping paid: P(skip) {q0} -> {up}");
    }

    #[test]
    fn the_vine_advantage_gives_the_all_action_gradient_in_expectation() {
        // E_a[A(s, a) ∂ log π(a|s)/∂z] over a ~ Bernoulli(σ(z)) must be D · ∂P(skip)/∂z with
        // D = Q(skip) − Q(play): ∂ log σ(z)/∂z = 1 − p, ∂ log σ(−z)/∂z = −p, ∂σ/∂z = p(1 − p).
        for &p in &[0.02, 0.3, 0.5, 0.9] {
            for &(q_skip, q_play) in &[(1.0, -2.0), (-0.5, 0.25), (3.0, 3.0)] {
                let a_skip = vine_advantage(p, q_skip, q_play);
                let a_play = vine_advantage(1.0 - p, q_play, q_skip);
                let expected = p * (1.0 - p) * a_skip + (1.0 - p) * (-p) * a_play;
                let all_action = (q_skip - q_play) * p * (1.0 - p);
                assert!((expected - all_action).abs() < 1e-12, "p {p}: {expected} vs {all_action}");
                // And the advantage is centred: its mean over the action is 0.
                assert!((p * a_skip + (1.0 - p) * a_play).abs() < 1e-12);
            }
        }
    }

    /// One update on 16 states, half skipped: the state advantage is `sign` where skipped and
    /// −`sign` where played; with `vine_sign`, every state is branched and the vine advantage
    /// is `vine_sign` where skipped and −`vine_sign` where played. Returns the mean P(skip)
    /// before and after.
    fn skip_update(sign: f32, vine_sign: Option<f32>) -> (f64, f64) {
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = PolicyNet::new(&vs.root(), 2, 3, 4, NetConfig { hidden: 8, skip: true, ..Default::default() });
        let mut opt = Adam::new(&vs, "", 1e-2, 1e-5);
        let b = 16i64;
        let opts = (Kind::Float, Device::Cpu);
        let global = Tensor::randn([b, 2], opts);
        let sites = Tensor::randn([b, 5, 3], opts);
        let mask = Tensor::ones([b, 5], opts);
        let skipped: Vec<f32> = (0..b).map(|i| (i < 8) as u8 as f32).collect();
        let skip = Tensor::from_slice(&skipped);
        let actions = Tensor::zeros([b, 5], (Kind::Int64, Device::Cpu));
        let evaluate = |net: &PolicyNet| {
            let stored = Stored {
                actions: &actions,
                prior: None,
                feasible: None,
                skip: Some((&skip, None)),
                current: None,
                rank_costs: None,
            };
            tch::no_grad(|| evaluate_actions(net, &global, &sites, &mask, stored))
        };
        let ev = evaluate(&net);
        let (old_skip_logp, _, p0) = ev.skip.unwrap();
        let adv: Vec<f32> = skipped.iter().map(|&s| if s > 0.0 { sign } else { -sign }).collect();
        let batch = Batch {
            global: global.shallow_clone(),
            sites: sites.shallow_clone(),
            mask: mask.shallow_clone(),
            actions: actions.shallow_clone(),
            logp: ev.logp,
            values: Tensor::zeros([b], opts),
            advantages: Tensor::from_slice(&adv),
            returns: Tensor::zeros([b], opts),
            prior: None,
            feasible: None,
            offset: None,
            skip: Some(SkipBatch {
                taken: skip.shallow_clone(),
                logp: old_skip_logp,
                margin: None,
                allowed: Tensor::ones([b], opts),
                vine: vine_sign.map(|v| {
                    let a: Vec<f32> = skipped.iter().map(|&s| if s > 0.0 { v } else { -v }).collect();
                    (Tensor::from_slice(&a), Tensor::ones([b], opts))
                }),
            }),
            current: None,
            rank_costs: None,
            teacher: None,
        };
        let cfg = PpoConfig {
            num_minibatches: 1,
            update_epochs: 4,
            target_kl: 0.0,
            ent_coef: 0.0,
            skip_vine: if vine_sign.is_some() { 1.0 } else { 0.0 },
            ..Default::default()
        };
        let stats = update(&cfg, &net, &vs, &mut opt, &batch, 1e-2, |n| (0..n as i64).collect());
        assert!(!stats.non_finite);
        let ev1 = evaluate(&net);
        let p1 = ev1.skip.unwrap().2;
        (p0.mean(Kind::Float).double_value(&[]), p1.mean(Kind::Float).double_value(&[]))
    }

    #[test]
    fn the_defer_loss_learns_the_decision_with_the_larger_mean_return_not_the_majority() {
        // Five states the head cannot tell apart (one logit). Deferring wins on three by 1 and
        // loses on two by 2: it loses on average, and the cost-weighted loss must not defer,
        // though a majority vote would. Mirrored, it must defer. With every Δ = 0, no loss.
        for (delta, defers) in [([1f32, 1., 1., -2., -2.], false), ([-1f32, -1., -1., 2., 2.], true)] {
            let delta = Tensor::from_slice(&delta);
            let z = Tensor::zeros([1], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
            for _ in 0..200 {
                let loss = defer_loss(&z.expand([5], false), &delta).unwrap();
                let g = tch::Tensor::run_backward(&[loss], &[&z], false, false).pop().unwrap();
                tch::no_grad(|| {
                    let _ = z.shallow_clone().g_sub_(&(g * 1.0));
                });
            }
            assert_eq!(z.double_value(&[0]) > 0.0, defers, "logit {}", z.double_value(&[0]));
        }
        let zero = Tensor::zeros([3], (Kind::Float, tch::Device::Cpu));
        assert!(defer_loss(&zero, &zero).is_none());
    }
}
