//! The policy network: one network for any number of sites.
//!
//! Each site is a token built from its features; the resource state (channel, progress, data
//! statistics) is a global token. Tokens are mixed by pooling (DeepSets with context):
//!
//! ```text
//! e_i    = tanh(W₂ tanh(W₁ s_i))                     site token            [B, L, H]
//! c      = tanh(W₄ tanh(W₃ g))                       global token          [B, H]
//! p      = mean_i e_i ‖ max_i e_i                    pooled over real sites [B, 2H]
//! h_i    = tanh(W₆ tanh(W₅ e_i + U₅ [p ‖ c]))        site in context       [B, L, H]
//! logits = W₇ h_i                                    categorical over ranks [B, L, K]
//! V_i    = W₉ tanh(W₈ h_i)                           value share of site i  [B, L]
//! z_skip = w_s·[p ‖ c] + b_s                         skip logit (optional)  [B]
//! π      = softplus(w_π·[p ‖ c] + b_π)               spend level (optional) [B]
//! z_def  = w₂·tanh(W₁[sg(p ‖ c) ‖ d] + b₁) + b₂      defer logit (optional) [B], own weights
//! ```
//!
//! With the spend level (`net.price`) the logits are `logits − π·κ`, κ_lj the relative cost of
//! rank j at site l: one number per state says how much the plan takes.
//!
//! The state value is V(s) = Σ_i V_i: with per-site credit (see [`crate::ppo`]) each V_i is
//! trained on site i's own reward stream, with shared credit only their sum is trained.
//! `W₅ e_i + U₅ [p ‖ c]` is a linear layer on the concatenation `[e_i ‖ p ‖ c]` split in two, so
//! the context part is computed once per state instead of once per site (a quarter of the
//! per-site cost).
//! Padding sites (mask 0) are excluded from the pools and get V_i = 0; their logits are ignored
//! by the caller.
//! Initialization follows CleanRL: orthogonal weights with gain √2, 0.01 for the policy head
//! (near-uniform initial policy) and 1 for the value head, zero biases.
//!
//! **With a prior** ([`crate::prior`]) the logits are a *residual*: the categorical over ranks
//! is `softmax(s·prior + W₇ h_i)`, with s = exp(`prior_log_scale`) a trained scalar (or a fixed
//! one), and W₇ and its bias start at zero, so an untrained network acts exactly as the prior.
//! With `prior.scale_residual` the multiplier is a temperature of the whole policy,
//! `softmax(s·(prior + W₇ h_i))`: a large s makes the sampled plans close to the greedy one
//! without making the residual negligible next to the prior.
//!
//! **With a skip head** (`net.skip = true`) the policy also decides, once per state, whether to
//! play the round at all: P(skip) = σ(z_skip). A skipped round sends nothing and keeps every
//! adapter (see `envs::VecEnv::step_indices_skipping`); it is what a policy should do in a deep
//! fade instead of squeezing its adapters to fit. The head starts with a small weight and a bias
//! of −2 (P(skip) ≈ 0.12), so skipping is explored from the start without dominating. With a
//! prior the skip logit is `s·margin + z_skip` with the prior's skip margin, and the head starts
//! at zero like the rank head.

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// Sizes of the network.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Width H of every hidden layer (default 64).
    pub hidden: i64,
    /// A skip head: the policy may skip a round (default false). Training turns it off on
    /// presets whose resource is a fixed parameter budget, where skipping saves nothing.
    #[serde(default)]
    pub skip: bool,
    /// The network also reads the episode's estimates (default false): the inferred horizon,
    /// η, removable loss, and per site its sensitivity, price, captured share and energy at
    /// every rank (`prior::ESTIMATE_GLOBAL_NAMES`, `prior::estimate_site_names`), appended to
    /// the normalized features. They come from the prior's online inference
    /// ([`crate::belief`]), which runs even when the prior's values are not used.
    #[serde(default)]
    pub estimates: bool,
    /// Plans fit the budget whose inferred probability of a lost round is this (default 0:
    /// off; needs `estimates` and no prior, whose own risk choice plays this part). The
    /// online inference measures the estimate's error x = ln(B_true / B_est) ~ N(μ̂, ŝ²) from
    /// the cost ratios of the rounds sent ([`crate::belief::Belief::budget_error`]), and plans
    /// fit B_est·exp(μ̂ + ŝ·Φ⁻¹(p)) instead of the environment's conservative budget, whose fixed
    /// safety margin loses a round in ten where the estimate is noisier than it assumes (a lost
    /// round costs about ten rounds' loss) and wastes budget where it is more precise. The
    /// budget is an estimate, not a decision: where the budget is fixed and known it is kept.
    #[serde(default)]
    pub loss_quantile: f64,
    /// A per-rank head (default false; needs `estimates`): each rank's logit is a small
    /// network, shared across ranks and sites, of the site in context and that rank's own
    /// estimates (energy share, price, energy still to capture, log rank). Rank j of site l is
    /// then judged by what choosing it would bring, not by its position in the rank set.
    #[serde(default)]
    pub rank_head: bool,
    /// A learned bonus κ on each site's current rank (default false): logits_lj += κ·[j =
    /// current_l], κ (`hold_bonus`) starting at [`HOLD_BONUS_INIT`]. A rank pays off only while
    /// it is held (a shrink drops what the site captured), so exploration that redraws every rank
    /// every round finds increments worthless; with the bonus a sampled plan keeps most ranks
    /// and changes a few, and PPO learns how strongly to hold.
    #[serde(default)]
    pub hold: bool,
    /// How a sampled plan is fitted to a binding budget (`model::sample_plan`); greedy
    /// decisions are the exact knapsack and ignore it.
    #[serde(default)]
    pub fit: SampleFit,
    /// Temporally consistent exploration (default 0, off): when sampling, a site that holds an
    /// adapter (current rank > 0) keeps its rank with probability ρ = `keep` and otherwise draws
    /// from its categorical p, so its distribution is the mixture q = (1 − ρ)·p + ρ·[j = current].
    /// PPO's ratio uses q, so the executed action's probability stays exact; greedy decisions use
    /// p alone. A rank pays off only while it is held (a shrink drops what the site captured), so
    /// exploration that redraws every rank every round finds growing a rank worth less than its
    /// cost; with ρ = 0.9 a drawn rank is held about ten rounds.
    #[serde(default)]
    pub keep: f64,
    /// Monotone utilities (default false): the network's rank logits become cumulative sums of
    /// non-negative increments, u_lj = Σ_{i=1..j} softplus(z_li) (u_l0 = 0), so more rank is
    /// never less likely to be worth it, and the budget's shadow price (and the greedy knapsack)
    /// decides how much of the budget a plan takes; the network decides where it goes. It is
    /// the knapsack's diminishing-returns structure as an architecture, not a model of the
    /// environment, and applies to the network's logits before any prior term.
    #[serde(default)]
    pub monotone: bool,
    /// A learned spend level (default false): a head on the pooled context gives one price
    /// π(s) = softplus(z_price) per state, and every rank's logit is lowered by π(s)·κ_lj, with
    /// κ_lj = (site l's cost of one rank unit ÷ the mean over the sites)·(r_j ÷ r_max)
    /// ([`crate::model::rank_costs`]). The network then says *how much* to spend in a state with
    /// one number and *where* with the per-site logits; with `monotone` the utilities cannot
    /// express a cost themselves, so this is what lets such a policy underspend a budget.
    #[serde(default)]
    pub price: bool,
    /// A defer head (default false; needs a prior and vine branches, `ppo.skip_vine` > 0): once
    /// per state the greedy policy may hand the round to its prior, playing the prior alone's
    /// decision (its skip rule and its plan) instead of its own ([`DeferHead`]). It is trained
    /// on the vine branches, not by PPO: a classifier of which of the two decisions returned
    /// more on the same draws ([`crate::ppo::defer_update`]). Sampling (training rollouts)
    /// never defers, so PPO's likelihoods stay those of the executed actions.
    #[serde(default)]
    pub defer: bool,
    /// The ranks are the prior's (default false; needs a prior): the network learns no residual
    /// on the rank utilities, so the rank logits are the prior's utilities at the learned
    /// temperature and the greedy plan is the prior's plan. What the network learns is then the
    /// skip decision and the values. The rank residual's weights are still created (the other
    /// weights start as without the option) and stay at their zero start.
    #[serde(default)]
    pub prior_ranks: bool,
}

/// How sampling fits a plan to a binding budget: each site's categorical is priced at a
/// shadow price μ (`log p − μ·cost`), then the sites are allocated one by one, each restricted to
/// the ranks that still fit. Whatever the choice, the plan's probability is exactly the
/// product PPO's ratio uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleFit {
    /// Which μ prices the categoricals (default `mode`).
    #[serde(default)]
    pub price: BudgetPrice,
    /// In which order the sites are allocated (default `random`).
    #[serde(default)]
    pub order: SiteOrder,
}

/// The shadow price μ of [`SampleFit`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BudgetPrice {
    /// The smallest μ at which every site's most likely rank fits together
    /// (`model::budget_price`). A broad policy's samples then overshoot the budget about half
    /// the time, and the masks squeeze the sites allocated last.
    #[default]
    Mode,
    /// The smallest μ at which the plan's expected cost under the priced categoricals fits
    /// (`model::budget_price_mean`): samples overshoot by their spread only, so the masks trim a
    /// few sites by a notch instead of squeezing many.
    Mean,
}

/// The allocation order of [`SampleFit`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SiteOrder {
    /// A uniformly random order every round.
    #[default]
    Random,
    /// The sites holding the largest ranks first (ties in random order). A shrink drops what a
    /// site captured, so a binding budget should trim the sites with the least to lose; under a
    /// random order every rank a site grows is lost whenever it happens to come last, which
    /// makes growing a rank worth less than it is.
    LargestFirst,
}

/// The initial price logit of `net.price`: softplus(1) ≈ 1.31, so at the start the largest rank
/// of an average site costs about as much utility as two of the monotone network's initial
/// increments (softplus(0) ≈ 0.69 each).
pub const PRICE_LOGIT_INIT: f64 = 1.0;

/// The initial hold bonus κ (`net.hold`): with 6 ranks and otherwise flat logits the current
/// rank is kept with probability e²/(e² + 5) ≈ 0.6.
pub const HOLD_BONUS_INIT: f64 = 2.0;

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            hidden: 64,
            skip: false,
            estimates: false,
            loss_quantile: 0.0,
            rank_head: false,
            hold: false,
            fit: SampleFit::default(),
            keep: 0.0,
            monotone: false,
            price: false,
            defer: false,
            prior_ranks: false,
        }
    }
}

/// Where the per-rank head finds each rank's inputs in a site row (the estimates follow the
/// observation's features, see `prior::ESTIMATE_SITE_NAMES`), and the rank set.
#[derive(Debug, Clone)]
pub struct RankInputs {
    /// Column of the site's price of its largest rank (`est_price_max_rank`).
    pub price: i64,
    /// Column of the captured share (`est_captured`).
    pub captured: i64,
    /// First column of the energy row (`est_energy_r<rank>`, one per rank).
    pub energy: i64,
    /// The rank set.
    pub ranks: Vec<u32>,
}

/// Inputs of the per-rank head for one (site, rank): energy share, price, energy still to
/// capture, log rank.
const RANK_INPUTS: i64 = 4;

/// The per-rank head (`net.rank_head`): logit_lj = w_o·tanh(W_h h_l + W_z z_lj + b) + b_o.
#[derive(Debug)]
struct RankHead {
    from_site: nn::Linear,
    from_rank: nn::Linear,
    out: nn::Linear,
    inputs: RankInputs,
    /// r_j / r_max and log2(1 + r_j) / log2(1 + r_max) per rank [K].
    rank_share: Tensor,
    rank_log: Tensor,
}

impl RankHead {
    /// The logits [B, L, K] from the sites in context `h` [B, L, H] and the site rows [B, L, F].
    fn forward(&self, h: &Tensor, sites: &Tensor) -> Tensor {
        let k = self.inputs.ranks.len() as i64;
        let energy = sites.narrow(-1, self.inputs.energy, k); // [B, L, K]
        let price = sites.narrow(-1, self.inputs.price, 1); // [B, L, 1]
        let captured = sites.narrow(-1, self.inputs.captured, 1);
        let dev = sites.device();
        let cost = price * self.rank_share.to_device(dev);
        let to_capture = (&energy - captured).clamp_min(0.0);
        let rank_log = self.rank_log.to_device(dev).expand_as(&energy);
        let z = Tensor::stack(&[energy, cost, to_capture, rank_log], -1); // [B, L, K, 4]
        let x = (self.from_site.forward(h).unsqueeze(2) + self.from_rank.forward(&z)).tanh();
        self.out.forward(&x).squeeze_dim(-1)
    }
}

/// What [`PolicyNet::forward`] computes for a batch of states.
#[derive(Debug)]
pub struct NetOutput {
    /// Per-site logits over the rank set [B, L, K] (the residual, with a prior).
    pub logits: Tensor,
    /// Per-site values [B, L] (0 at padding).
    pub site_values: Tensor,
    /// Skip logit z_skip [B], with a skip head.
    pub skip_logit: Option<Tensor>,
    /// Price logit z_price [B], with `net.price`: the spend level is softplus(z_price).
    pub price_logit: Option<Tensor>,
    /// The state's context [p ‖ c] [B, 3H]: what the skip, price and defer heads read.
    pub context: Tensor,
}

fn layer(p: nn::Path, i: i64, o: i64, gain: f64) -> nn::Linear {
    nn::linear(
        p,
        i,
        o,
        nn::LinearConfig { ws_init: nn::Init::Orthogonal { gain }, bs_init: Some(nn::Init::Const(0.0)), bias: true },
    )
}

/// Weights of the shared-across-sites policy/value network.
#[derive(Debug)]
pub struct PolicyNet {
    site1: nn::Linear,
    site2: nn::Linear,
    glob1: nn::Linear,
    glob2: nn::Linear,
    mix1_site: nn::Linear,
    mix1_ctx: nn::Linear,
    mix2: nn::Linear,
    logits: nn::Linear,
    value1: nn::Linear,
    value2: nn::Linear,
    skip: Option<nn::Linear>,
    /// The spend-level head of `net.price`.
    price: Option<nn::Linear>,
    rank_head: Option<RankHead>,
    prior_scale: Option<PriorScale>,
    /// The prior's multiplier also scales the residual: logits = s·(prior + residual).
    scale_residual: bool,
    /// κ of `net.hold`: the bonus on each site's current rank.
    hold_bonus: Option<Tensor>,
    /// ρ of `net.keep`: the probability that sampling keeps a site's current rank.
    keep: f64,
    /// `net.monotone`: the rank logits are cumulative non-negative increments.
    monotone: bool,
    /// `net.prior_ranks` with a prior: no learned residual on the rank utilities.
    prior_ranks: bool,
}

/// How the learned greedy decision of a state differs from its prior alone's: the inputs of the
/// [`DeferHead`] besides the state's context (`model::PolicyModel::act` computes them).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DeferInputs {
    /// (what the learned decision sends − what the prior's sends) ÷ the larger of the two, in
    /// [−1, 1] (0 when both send nothing): how much more the learned plan spends.
    pub spend_difference: f32,
    /// The share of sites whose rank differs between the two decisions (a skipped round keeps
    /// every current rank).
    pub sites_changed: f32,
    /// 1 when the learned decision skips the round.
    pub learned_skips: f32,
    /// 1 when the prior's decision skips the round.
    pub prior_skips: f32,
}

impl DeferInputs {
    /// Width of [`DeferInputs::row`].
    pub const LEN: usize = 4;

    /// The inputs as one row, in field order.
    pub fn row(&self) -> [f32; Self::LEN] {
        [self.spend_difference, self.sites_changed, self.learned_skips, self.prior_skips]
    }
}

/// The defer head (`net.defer`): P(defer | s) = σ(w₂·tanh(W₁ [sg(p ‖ c) ‖ d] + b₁) + b₂), with d
/// the [`DeferInputs`] and sg a stopped gradient: the head reads the policy's context but never
/// trains it. The output layer starts at zero (z = 0: the greedy policy defers only once the
/// head has learned that the prior does better).
#[derive(Debug)]
pub struct DeferHead {
    hidden: nn::Linear,
    out: nn::Linear,
}

impl DeferHead {
    /// Creates the variables under `p` for a context of `context_dim` and `hidden` units.
    pub fn new(p: &nn::Path, context_dim: i64, hidden: i64) -> Self {
        DeferHead {
            hidden: layer(p / "hidden", context_dim + DeferInputs::LEN as i64, hidden, 2f64.sqrt()),
            out: nn::linear(
                p / "out",
                hidden,
                1,
                nn::LinearConfig { ws_init: nn::Init::Const(0.0), bs_init: Some(nn::Init::Const(0.0)), bias: true },
            ),
        }
    }

    /// The defer logit [B] from the context [B, 3H] ([`NetOutput::context`], detached here) and
    /// the inputs [B, 4] ([`DeferInputs::row`]).
    pub fn logit(&self, context: &Tensor, inputs: &Tensor) -> Tensor {
        let x = Tensor::cat(&[context.detach(), inputs.shallow_clone()], -1);
        self.out.forward(&self.hidden.forward(&x).tanh()).squeeze_dim(-1)
    }
}

/// The multiplier of the prior in the logits.
#[derive(Debug)]
enum PriorScale {
    /// ln s, trained with the network (`prior_log_scale`).
    Learned(Tensor),
    /// A constant s.
    Fixed(f64),
}

impl PolicyNet {
    /// Creates the variables under `p` for `global_dim` global features, `site_dim` per-site
    /// features and `n_ranks` rank choices.
    pub fn new(p: &nn::Path, global_dim: i64, site_dim: i64, n_ranks: i64, cfg: NetConfig) -> Self {
        Self::with_prior(p, global_dim, site_dim, n_ranks, cfg, None, None)
    }

    /// Same as [`PolicyNet::new`], with a prior added to the logits: `prior` = (initial scale,
    /// trained or not, the scale multiplies the residual too). The policy head then starts at
    /// zero (a pure residual). `rank_inputs` locates the per-rank head's inputs in a site row
    /// (required with `cfg.rank_head`, ignored without).
    pub fn with_prior(
        p: &nn::Path,
        global_dim: i64,
        site_dim: i64,
        n_ranks: i64,
        cfg: NetConfig,
        prior: Option<(f64, bool, bool)>,
        rank_inputs: Option<RankInputs>,
    ) -> Self {
        let h = cfg.hidden;
        let g = 2f64.sqrt();
        let rank_head = rank_inputs.filter(|_| cfg.rank_head).map(|inputs| {
            let r_max = *inputs.ranks.last().unwrap_or(&1) as f32;
            let share: Vec<f32> = inputs.ranks.iter().map(|&r| r as f32 / r_max).collect();
            let log: Vec<f32> = inputs.ranks.iter().map(|&r| (1.0 + r as f32).log2() / (1.0 + r_max).log2()).collect();
            RankHead {
                from_site: layer(p / "rank_site", h, h, g),
                from_rank: nn::linear(
                    p / "rank_inputs",
                    RANK_INPUTS,
                    h,
                    nn::LinearConfig { ws_init: nn::Init::Orthogonal { gain: g }, bs_init: None, bias: false },
                ),
                // Like the plain head: near-uniform at the start, or zero as a residual.
                out: match prior {
                    Some(_) => nn::linear(
                        p / "rank_out",
                        h,
                        1,
                        nn::LinearConfig {
                            ws_init: nn::Init::Const(0.0),
                            bs_init: Some(nn::Init::Const(0.0)),
                            bias: true,
                        },
                    ),
                    None => layer(p / "rank_out", h, 1, 0.01),
                },
                inputs,
                rank_share: Tensor::from_slice(&share),
                rank_log: Tensor::from_slice(&log),
            }
        });
        PolicyNet {
            rank_head,
            site1: layer(p / "site1", site_dim, h, g),
            site2: layer(p / "site2", h, h, g),
            glob1: layer(p / "glob1", global_dim, h, g),
            glob2: layer(p / "glob2", h, h, g),
            mix1_site: layer(p / "mix1_site", h, h, g),
            mix1_ctx: nn::linear(
                p / "mix1_ctx",
                3 * h,
                h,
                nn::LinearConfig { ws_init: nn::Init::Orthogonal { gain: g }, bs_init: None, bias: false },
            ),
            mix2: layer(p / "mix2", h, h, g),
            logits: match prior {
                Some(_) => nn::linear(
                    p / "logits",
                    h,
                    n_ranks,
                    nn::LinearConfig { ws_init: nn::Init::Const(0.0), bs_init: Some(nn::Init::Const(0.0)), bias: true },
                ),
                None => layer(p / "logits", h, n_ranks, 0.01),
            },
            value1: layer(p / "value1", h, h, g),
            value2: layer(p / "value2", h, 1, 1.0),
            skip: cfg.skip.then(|| {
                nn::linear(
                    p / "skip",
                    3 * h,
                    1,
                    match prior {
                        // A residual to the prior's skip margin: starts at zero.
                        Some(_) => nn::LinearConfig {
                            ws_init: nn::Init::Const(0.0),
                            bs_init: Some(nn::Init::Const(0.0)),
                            bias: true,
                        },
                        None => nn::LinearConfig {
                            ws_init: nn::Init::Orthogonal { gain: 0.01 },
                            bs_init: Some(nn::Init::Const(-2.0)),
                            bias: true,
                        },
                    },
                )
            }),
            scale_residual: prior.is_some_and(|(_, _, r)| r),
            prior_scale: prior.map(|(scale, learn, _)| {
                if learn {
                    PriorScale::Learned(p.var("prior_log_scale", &[], nn::Init::Const(scale.ln())))
                } else {
                    PriorScale::Fixed(scale)
                }
            }),
            // Created last and without randomness: the other weights start as without it.
            hold_bonus: cfg.hold.then(|| p.var("hold_bonus", &[], nn::Init::Const(HOLD_BONUS_INIT))),
            // Also created after every other weight; a small weight and the bias of
            // PRICE_LOGIT_INIT, so the first plans differ little from state to state.
            price: cfg.price.then(|| {
                nn::linear(
                    p / "price",
                    3 * h,
                    1,
                    nn::LinearConfig {
                        ws_init: nn::Init::Orthogonal { gain: 0.01 },
                        bs_init: Some(nn::Init::Const(PRICE_LOGIT_INIT)),
                        bias: true,
                    },
                )
            }),
            keep: cfg.keep,
            monotone: cfg.monotone,
            prior_ranks: cfg.prior_ranks && prior.is_some(),
        }
    }

    /// The policy's logits [B, L, K] from the network's (residual) logits and the prior's
    /// utilities [B, L, K] (ignored when the network has no prior).
    /// With `net.hold`, `current` [B, L] (int64) is each site's current rank index, whose logit
    /// gets the bonus κ.
    pub fn policy_logits(&self, residual: &Tensor, prior: Option<&Tensor>, current: Option<&Tensor>) -> Tensor {
        let monotone = self.monotone.then(|| {
            let k = residual.size()[residual.dim() - 1];
            let inc = residual.narrow(-1, 1, k - 1).softplus().cumsum(-1, Kind::Float);
            Tensor::cat(&[residual.narrow(-1, 0, 1).zeros_like(), inc], -1)
        });
        let logits = self.with_prior_term(monotone.as_ref().unwrap_or(residual), prior);
        match (&self.hold_bonus, current) {
            (Some(kappa), Some(cur)) => {
                let k = residual.size()[residual.dim() - 1];
                logits + cur.one_hot(k).to_kind(Kind::Float) * kappa
            }
            _ => logits,
        }
    }

    /// With `net.price`, the logits lowered by the state's price times each rank's cost:
    /// `logits − softplus(z_price)·κ`, with `price_logit` [B] from [`NetOutput::price_logit`] and
    /// `rank_costs` κ [B, L, K] ([`crate::model::rank_costs`] per site). The logits unchanged
    /// without the head.
    pub fn priced(&self, logits: Tensor, price_logit: Option<&Tensor>, rank_costs: Option<&Tensor>) -> Tensor {
        match (price_logit, rank_costs) {
            (Some(z), Some(kappa)) => logits - z.softplus().view([-1, 1, 1]) * kappa,
            _ => logits,
        }
    }

    /// True with the spend-level head (`net.price`): the logits need each rank's cost.
    pub fn has_price(&self) -> bool {
        self.price.is_some()
    }

    /// True with a hold bonus (`net.hold`): the logits need each site's current rank.
    pub fn has_hold(&self) -> bool {
        self.hold_bonus.is_some()
    }

    /// True when the policy's logits or its sampling distribution need each site's current
    /// rank (`net.hold`, `net.keep`).
    pub fn needs_current(&self) -> bool {
        self.has_hold() || self.keep > 0.0
    }

    /// With `net.keep` = ρ > 0, the log-probabilities sampling draws from [B, L, K], given the
    /// policy's logits and each site's current rank index [B, L] (int64): log((1 − ρ)·p + ρ·[j =
    /// current]) at sites holding an adapter (current index > 0), log p elsewhere. `None`
    /// without `net.keep` (sampling then draws from p itself).
    pub fn keep_mixture(&self, logits: &Tensor, current: Option<&Tensor>) -> Option<Tensor> {
        let cur = current.filter(|_| self.keep > 0.0)?;
        let k = logits.size()[logits.dim() - 1];
        let rho = cur.gt(0).to_kind(Kind::Float).unsqueeze(-1) * self.keep;
        let p = logits.softmax(-1, Kind::Float);
        let q = p * (rho.ones_like() - &rho) + cur.one_hot(k).to_kind(Kind::Float) * &rho;
        // p > 0 wherever a softmax is finite; the floor only guards underflow.
        Some(q.clamp_min(1e-30).log())
    }

    /// `s·u + residual`, or `s·(u + residual)` with a scaled residual.
    fn with_prior_term(&self, residual: &Tensor, u: Option<&Tensor>) -> Tensor {
        if self.scale_residual
            && let Some(u) = u
        {
            return match &self.prior_scale {
                Some(PriorScale::Learned(ls)) => (residual + u) * ls.exp(),
                Some(PriorScale::Fixed(s)) => (residual + u) * *s,
                None => residual.shallow_clone(),
            };
        }
        match (&self.prior_scale, u) {
            (Some(PriorScale::Learned(ls)), Some(u)) => residual + u * ls.exp(),
            (Some(PriorScale::Fixed(s)), Some(u)) => residual + u * *s,
            _ => residual.shallow_clone(),
        }
    }

    /// The skip logit [B] from the network's (residual) skip logit and the prior's skip margin
    /// [B] (ignored when the network has no prior): `s·margin + residual`.
    pub fn policy_skip_logit(&self, residual: &Tensor, margin: Option<&Tensor>) -> Tensor {
        self.with_prior_term(residual, margin)
    }

    /// The logits [B, L, K] of the prior alone for the prior's utilities `u`, detached: what
    /// [`PolicyNet::policy_logits`] gives with the residual at zero (the same temperature).
    pub fn prior_alone(&self, u: &Tensor) -> Tensor {
        tch::no_grad(|| self.with_prior_term(&u.zeros_like(), Some(u)))
    }

    /// The current multiplier of the prior (None without a prior).
    pub fn prior_scale(&self) -> Option<f64> {
        self.prior_scale.as_ref().map(|s| match s {
            PriorScale::Learned(t) => t.exp().double_value(&[]),
            PriorScale::Fixed(s) => *s,
        })
    }

    /// True when the network has a skip head.
    pub fn has_skip(&self) -> bool {
        self.skip.is_some()
    }

    /// `global` [B, G], `sites` [B, L, F], `mask` [B, L] (1 real site, 0 padding), all float.
    pub fn forward(&self, global: &Tensor, sites: &Tensor, mask: &Tensor) -> NetOutput {
        let e = self.site2.forward(&self.site1.forward(sites).tanh()).tanh();
        let c = self.glob2.forward(&self.glob1.forward(global).tanh()).tanh();
        let m = mask.unsqueeze(-1);
        let count = m.sum_dim_intlist(1, false, Kind::Float).clamp_min(1.0);
        let mean = (&e * &m).sum_dim_intlist(1, false, Kind::Float) / count;
        // Padding must never win the max: push it far below tanh's range.
        let max = (&e + (&m - 1.0) * 4.0).amax(1, false);
        let pooled = Tensor::cat(&[mean, max], -1);
        let pc = Tensor::cat(&[&pooled, &c], -1);
        let skip_logit = self.skip.as_ref().map(|s| s.forward(&pc).squeeze_dim(-1));
        let price_logit = self.price.as_ref().map(|s| s.forward(&pc).squeeze_dim(-1));
        let ctx = self.mix1_ctx.forward(&pc).unsqueeze(1);
        let h = self.mix2.forward(&(self.mix1_site.forward(&e) + ctx).tanh()).tanh();
        let mut logits = self.logits.forward(&h);
        if self.prior_ranks {
            // No residual: the rank logits are the prior's alone (`policy_logits`).
            logits = logits.zeros_like();
        } else if let Some(head) = &self.rank_head {
            logits += head.forward(&h, sites);
        }
        let site_values = self.value2.forward(&self.value1.forward(&h).tanh()).squeeze_dim(-1) * mask;
        NetOutput { logits, site_values, skip_logit, price_logit, context: pc }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn shapes_and_padding_invariance() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = PolicyNet::new(&vs.root(), 5, 7, 8, NetConfig { hidden: 16, skip: true, ..Default::default() });
        let g = Tensor::randn([2, 5], (Kind::Float, Device::Cpu));
        let s = Tensor::randn([2, 3, 7], (Kind::Float, Device::Cpu));
        let mask = Tensor::ones([2, 3], (Kind::Float, Device::Cpu));
        let out = net.forward(&g, &s, &mask);
        let (logits, v, z) = (out.logits, out.site_values, out.skip_logit.unwrap());
        assert_eq!(logits.size(), vec![2, 3, 8]);
        assert_eq!(v.size(), vec![2, 3]);
        assert_eq!(z.size(), vec![2]);
        // Adding a padding site changes nothing for the real ones.
        let s_pad = Tensor::cat(&[&s, &Tensor::randn([2, 1, 7], (Kind::Float, Device::Cpu))], 1);
        let mask_pad = Tensor::cat(&[&mask, &Tensor::zeros([2, 1], (Kind::Float, Device::Cpu))], 1);
        let out = net.forward(&g, &s_pad, &mask_pad);
        let (logits_pad, v_pad) = (out.logits, out.site_values);
        assert!((out.skip_logit.unwrap() - &z).abs().max().double_value(&[]) < 1e-6);
        let diff = (logits_pad.narrow(1, 0, 3) - &logits).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "{diff}");
        assert!((v_pad.narrow(1, 0, 3) - &v).abs().max().double_value(&[]) < 1e-6);
        assert_eq!(v_pad.narrow(1, 3, 1).abs().sum(Kind::Float).double_value(&[]), 0.0);
    }

    #[test]
    fn the_rank_head_reads_each_ranks_own_estimates() {
        tch::manual_seed(1);
        let vs = nn::VarStore::new(Device::Cpu);
        let ranks = vec![0, 1, 2, 4];
        let inputs = RankInputs { price: 1, captured: 2, energy: 3, ranks: ranks.clone() };
        let cfg =
            NetConfig { hidden: 16, skip: false, estimates: true, rank_head: true, hold: false, ..Default::default() };
        let net = PolicyNet::with_prior(&vs.root(), 5, 7, 4, cfg, None, Some(inputs));
        let s = Tensor::rand([2, 3, 7], (Kind::Float, Device::Cpu));
        let h = Tensor::randn([2, 3, 16], (Kind::Float, Device::Cpu));
        let head = net.rank_head.as_ref().unwrap();
        let got = head.forward(&h, &s);
        assert_eq!(got.size(), vec![2, 3, 4]);
        // By hand for every (state, site, rank): energy share, price · r/r_max, energy still to
        // capture, log rank, through the same weights.
        let row = |b: i64, l: i64| -> Vec<f64> { (0..7).map(|c| s.double_value(&[b, l, c])).collect() };
        for (b, l) in [(0, 0), (1, 2)] {
            let x = row(b, l);
            for (j, &r) in ranks.iter().enumerate() {
                let e = x[3 + j];
                let z = [e, x[1] * r as f64 / 4.0, (e - x[2]).max(0.0), (1.0 + r as f64).log2() / 5f64.log2()];
                let z = Tensor::from_slice(&z.map(|v| v as f32)).view([1, 4]);
                let hl = h.get(b).get(l).view([1, 16]);
                let want = head.out.forward(&(head.from_site.forward(&hl) + head.from_rank.forward(&z)).tanh());
                let d = (want.double_value(&[0, 0]) - got.double_value(&[b, l, j as i64])).abs();
                assert!(d < 1e-5, "state {b}, site {l}, rank {r}: {d}");
            }
        }
        // And the network adds it to the plain head's logits.
        let mask = Tensor::ones([2, 3], (Kind::Float, Device::Cpu));
        assert_eq!(
            net.forward(&Tensor::randn([2, 5], (Kind::Float, Device::Cpu)), &s, &mask).logits.size(),
            vec![2, 3, 4]
        );
    }

    #[test]
    fn monotone_utilities_are_cumulative_softplus_increments_starting_at_zero() {
        let vs = nn::VarStore::new(Device::Cpu);
        let net = PolicyNet::new(&vs.root(), 5, 7, 4, NetConfig { hidden: 8, monotone: true, ..Default::default() });
        let residual = Tensor::randn([2, 3, 4], (Kind::Float, Device::Cpu)) * 3.0;
        let u = net.policy_logits(&residual, None, None);
        for (b, l) in [(0, 0), (0, 2), (1, 1)] {
            let mut want = 0.0;
            for j in 0..4 {
                if j > 0 {
                    want += (residual.double_value(&[b, l, j]).exp()).ln_1p();
                }
                assert!((u.double_value(&[b, l, j]) - want).abs() < 1e-5, "state {b}, site {l}, rank {j}");
            }
        }
        // Never decreasing in rank, whatever the network says.
        let steps = u.narrow(-1, 1, 3) - u.narrow(-1, 0, 3);
        assert!(steps.min().double_value(&[]) >= 0.0);
    }

    #[test]
    fn the_spend_level_lowers_each_rank_by_its_cost_times_one_price_per_state() {
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = NetConfig { hidden: 8, monotone: true, price: true, ..Default::default() };
        let net = PolicyNet::new(&vs.root(), 5, 7, 4, cfg);
        assert!(net.has_price());
        let out = net.forward(
            &Tensor::randn([2, 5], (Kind::Float, Device::Cpu)),
            &Tensor::randn([2, 3, 7], (Kind::Float, Device::Cpu)),
            &Tensor::ones([2, 3], (Kind::Float, Device::Cpu)),
        );
        let z = out.price_logit.as_ref().expect("a price logit per state");
        assert_eq!(z.size(), vec![2]);
        // It starts near softplus(PRICE_LOGIT_INIT) in every state.
        for b in 0..2 {
            let want = PRICE_LOGIT_INIT.exp().ln_1p();
            assert!((z.double_value(&[b]).exp().ln_1p() - want).abs() < 0.05);
        }
        let ranks = [0u32, 1, 2, 4];
        let kappa_rows = crate::model::rank_costs(&[1.0, 2.0, 3.0], &ranks);
        let kappa = Tensor::from_slice(&kappa_rows).view([1, 3, 4]).expand([2, 3, 4], false);
        let logits = net.policy_logits(&out.logits, None, None);
        let got = net.priced(logits.shallow_clone(), Some(z), Some(&kappa));
        for b in 0..2 {
            let pi = z.double_value(&[b]).exp().ln_1p();
            for l in 0..3 {
                for (j, &r) in ranks.iter().enumerate() {
                    // κ = (unit cost ÷ mean unit cost) · r ÷ r_max, the mean unit cost being 2.
                    let k = (l as f64 + 1.0) / 2.0 * r as f64 / 4.0;
                    let want = logits.double_value(&[b, l, j as i64]) - pi * k;
                    assert!((got.double_value(&[b, l, j as i64]) - want).abs() < 1e-5, "state {b}, site {l}, rank {r}");
                }
            }
        }
        // A high enough price makes rank 0 the most likely everywhere, which monotone utilities
        // alone cannot express: the policy can underspend.
        let high = Tensor::full([2], 50.0, (Kind::Float, Device::Cpu));
        let best = net.priced(logits, Some(&high), Some(&kappa)).argmax(-1, false);
        assert_eq!(best.sum(Kind::Int64).int64_value(&[]), 0);
        // Without the head nothing changes.
        let plain = PolicyNet::new(
            &nn::VarStore::new(Device::Cpu).root(),
            5,
            7,
            4,
            NetConfig { hidden: 8, ..Default::default() },
        );
        assert!(!plain.has_price());
    }

    #[test]
    fn the_hold_bonus_adds_kappa_to_each_sites_current_rank_and_only_there() {
        tch::manual_seed(2);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = PolicyNet::new(&vs.root(), 5, 7, 4, NetConfig { hidden: 8, hold: true, ..Default::default() });
        assert!(net.has_hold());
        let residual = Tensor::randn([2, 3, 4], (Kind::Float, Device::Cpu));
        let current = Tensor::from_slice(&[0i64, 3, 1, 2, 2, 0]).view([2, 3]);
        let got = net.policy_logits(&residual, None, Some(&current)) - &residual;
        for b in 0..2 {
            for l in 0..3 {
                let c = current.int64_value(&[b, l]);
                for j in 0..4 {
                    let want = if j == c { HOLD_BONUS_INIT } else { 0.0 };
                    assert!((got.double_value(&[b, l, j]) - want).abs() < 1e-6, "state {b}, site {l}, rank {j}");
                }
            }
        }
        // A trained variable: it is in the store, and without the option the logits are the residual's.
        assert!(vs.variables().contains_key("hold_bonus"));
        let plain = PolicyNet::new(
            &nn::VarStore::new(Device::Cpu).root(),
            5,
            7,
            4,
            NetConfig { hidden: 8, ..Default::default() },
        );
        assert_eq!(plain.policy_logits(&residual, None, Some(&current)), residual);
    }
}
