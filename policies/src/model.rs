//! A rank policy ready to act: network weights, frozen observation statistics, the optional DDIM
//! refiner, and the feasibility projection. Used by the trainer (sampling) and by evaluation and
//! real runs (greedy), through [`envs::RankPolicy`].

use crate::PolicyError;
use crate::belief::Belief;
use rand::Rng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor, nn};

use envs::{GLOBAL_FEATURES, GlobalFeature, Observation, RankPolicy, RoundContext, SITE_FEATURES, SiteFeature};

use crate::ddim::{self, DdimConfig, Denoiser};
use crate::network::{BudgetPrice, DeferHead, DeferInputs, NetConfig, PolicyNet, SampleFit, SiteOrder};
use crate::normalize::ObsNormalizer;
use crate::prior::{ESTIMATE_GLOBAL_NAMES, ESTIMATE_SITE_NAMES, Prior, PriorConfig, PriorOutput, Want};
use crate::projection::project_to_budget;

/// A batch of raw observations, as [`envs::VecEnv`] lays them out: `n_envs` rows of
/// [`GLOBAL_FEATURES`] in `global`, `n_envs × n_sites` rows of [`SITE_FEATURES`] in `sites`.
#[derive(Debug, Clone, Copy)]
pub struct ObsBatch<'a> {
    /// Global features, `n_envs × GLOBAL_FEATURES`.
    pub global: &'a [f32],
    /// Per-site features, `n_envs × n_sites × SITE_FEATURES`.
    pub sites: &'a [f32],
    /// Environments in the batch.
    pub n_envs: usize,
    /// Sites per environment.
    pub n_sites: usize,
}

impl<'a> ObsBatch<'a> {
    /// A batch of one observation.
    pub fn one(obs: &'a Observation) -> Self {
        ObsBatch { global: &obs.global, sites: &obs.sites, n_envs: 1, n_sites: obs.n_sites }
    }
}

/// What the allocation needs besides the observation: the cost of one rank unit at each site,
/// each environment's (estimated) budget, and optionally each site's min(d_in, d_out).
#[derive(Debug, Clone, Copy)]
pub struct BudgetContext<'a> {
    /// Cost of one rank unit per site (resource unit).
    pub unit_cost: &'a [f64],
    /// Budget per environment (resource unit).
    pub budgets: &'a [f64],
    /// min(d_in, d_out) per site, for the prior; `None` assumes `prior.default_dim`.
    pub dims: Option<&'a [u32]>,
    /// The run's cost coefficient λ ([`RoundContext::cost_coef`]); a prior that infers values
    /// plans at it instead of its belief `cost_coef`. `None`: the belief.
    pub cost_coef: Option<f64>,
}

/// What a checkpoint's observations and actions look like; a policy only acts on inputs that
/// match it exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schema {
    /// Global feature names, in order.
    pub global_features: Vec<String>,
    /// Per-site feature names, in order.
    pub site_features: Vec<String>,
    /// The rank set the categorical heads choose from.
    pub ranks: Vec<u32>,
}

impl Schema {
    /// The schema of this build's environments with the given rank set.
    pub fn current(ranks: &[u32]) -> Self {
        Schema {
            global_features: envs::observation::GLOBAL_NAMES.iter().map(|s| s.to_string()).collect(),
            site_features: envs::observation::SITE_NAMES.iter().map(|s| s.to_string()).collect(),
            ranks: ranks.to_vec(),
        }
    }

    /// Explains the first difference from `other` (the environment or run the policy is used on).
    pub fn check_compatible(&self, other: &Schema) -> Result<(), PolicyError> {
        if self.ranks != other.ranks {
            return Err(PolicyError::Incompatible(format!(
                "the policy chooses from ranks {:?}, the environment uses {:?}",
                self.ranks, other.ranks
            )));
        }
        if self.global_features != other.global_features || self.site_features != other.site_features {
            return Err(PolicyError::Incompatible(format!(
                "observation schema differs: policy has {} global + {} site features, this build has {} + {} (names: policy {:?} / {:?})",
                self.global_features.len(),
                self.site_features.len(),
                other.global_features.len(),
                other.site_features.len(),
                self.global_features,
                self.site_features
            )));
        }
        Ok(())
    }
}

/// How [`PolicyModel::act`] picks ranks from the categorical heads.
pub enum ActMode<'a> {
    /// Sample from each site's distribution (training).
    Sample(&'a mut ChaCha8Rng),
    /// The most likely rank per site (evaluation, real runs).
    Greedy,
    /// Each environment's first decision of a vine branch ([`crate::ppo::PpoConfig::skip_vine`]):
    /// skip, play the most likely plan, or play the prior alone's decision. Never defers.
    Branch(&'a [Branch]),
}

/// The decision a vine branch starts with ([`ActMode::Branch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Branch {
    /// Skip the round (where the resource allows it; otherwise play the most likely plan).
    Skip,
    /// Play the most likely plan.
    Play,
    /// The prior alone's decision: its skip rule and its most likely plan (what `net.defer`
    /// hands the round to).
    Prior,
}

/// One batch of decisions for `n_envs` states.
#[derive(Debug, Clone, Default)]
pub struct Decision {
    /// PPO's per-site rank indices (the action PPO is trained on), `n_envs × n_sites`.
    pub coarse: Vec<u8>,
    /// Log-probability of each coarse index under the current policy: when sampling, the
    /// probability given the site's feasibility mask (so the plan's probability is their product).
    pub logp: Vec<f32>,
    /// When sampling: which ranks fitted the budget left when each site was allocated,
    /// `n_envs × n_sites × K` (empty when greedy). PPO's ratio is taken under these masks.
    pub feasible: Vec<bool>,
    /// When sampling: the budget's price μ·cost subtracted from each site's logits before the
    /// masked softmax ([`budget_price`]), `n_envs × n_sites × K` (empty when greedy).
    pub offset: Vec<f32>,
    /// The plan that is executed: coarse, refined by DDIM when enabled, then projected.
    pub executed: Vec<u8>,
    /// Per-site values V_i(s), `n_envs × n_sites`.
    pub values: Vec<f32>,
    /// The normalized global features the decision saw, `n_envs × G` (stored by the trainer).
    pub global: Vec<f32>,
    /// The normalized site features the decision saw, `n_envs × n_sites × F`.
    pub sites: Vec<f32>,
    /// The prior's utilities the decision saw, `n_envs × n_sites × K` (empty without a prior).
    pub prior: Vec<f32>,
    /// Per environment: skip the round (always false without a skip head). A skipped
    /// environment's `executed` (and `coarse`) row is its current plan, which it keeps.
    pub skip: Vec<bool>,
    /// Per environment: whether the resource allows skipping (the skip head is masked where not).
    pub skip_allowed: Vec<bool>,
    /// Log-probability of each skip decision (empty without a skip head).
    pub skip_logp: Vec<f32>,
    /// The prior's skip margin per environment (empty without a skip head or without a prior).
    pub skip_margin: Vec<f32>,
    /// Each site's current rank index, `n_envs × n_sites` (what a hold bonus acts on).
    pub current: Vec<u8>,
    /// Sampled sites whose feasibility mask removed more than 1 % of their priced probability
    /// (0 when greedy): how often a binding budget squeezed a choice.
    pub trimmed: usize,
    /// The spend level softplus(z_price) per environment, with `net.price` (empty otherwise).
    pub spend_price: Vec<f32>,
    /// Per environment: the round was handed to the prior alone's decision (`net.defer`; empty
    /// without a defer head or when sampling).
    pub deferred: Vec<bool>,
    /// Per environment: how the learned greedy decision differs from the prior's, what the
    /// defer head read (empty without a defer head or when sampling).
    pub defer_inputs: Vec<DeferInputs>,
}

/// Network + statistics + refiner: everything needed to turn observations into plans.
pub struct PolicyModel {
    /// All weights (`net.*`, `ddim.*`).
    pub vs: nn::VarStore,
    /// The PPO policy/value network.
    pub net: PolicyNet,
    /// The DDIM refiner, when configured.
    pub denoiser: Option<Denoiser>,
    /// DDIM settings.
    pub ddim: DdimConfig,
    /// ᾱ_t of the DDIM schedule.
    pub alpha_bar: Vec<f64>,
    /// Observation statistics.
    pub norm: ObsNormalizer,
    /// The rank set.
    pub ranks: Vec<u32>,
    /// Whether DDIM refines plans (enabled and warmed up).
    pub ddim_active: bool,
    /// The model-based prior the network's logits are a residual to, when enabled.
    pub prior: Option<Prior>,
    /// With `net.estimates` and no prior: the prior's online inference alone, whose
    /// estimates the network reads (its values are never used).
    pub estimator: Option<Prior>,
    /// The network reads the estimates (`net.estimates`).
    pub estimates: bool,
    /// Without a prior: plans fit the budget with this inferred probability of a lost round
    /// (`net.loss_quantile`; 0: the given budget).
    pub loss_quantile: f64,
    /// How sampled plans are fitted to a binding budget (`net.fit`).
    pub fit: SampleFit,
    /// The defer head (`net.defer`, with a prior): its weights are `defer.*`, outside `net.*`,
    /// since PPO does not train them.
    pub defer: Option<DeferHead>,
}

impl PolicyModel {
    /// Fresh weights on `device`, without a prior.
    pub fn new(device: Device, ranks: &[u32], net: NetConfig, ddim: DdimConfig) -> Self {
        Self::with_prior(device, ranks, net, ddim, &PriorConfig::default())
    }

    /// Fresh weights on `device`; with `prior.enabled` the network's logits are a residual to the
    /// model-based prior (its head starts at zero, see [`crate::prior`]).
    pub fn with_prior(device: Device, ranks: &[u32], net: NetConfig, ddim: DdimConfig, prior: &PriorConfig) -> Self {
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let (g_dim, s_dim) = input_dims(net.estimates, ranks.len());
        let network = PolicyNet::with_prior(
            &(&root / "net"),
            g_dim as i64,
            s_dim as i64,
            ranks.len() as i64,
            net,
            prior.enabled.then_some((prior.scale, prior.learn_scale, prior.scale_residual)),
            net.estimates.then(|| crate::network::RankInputs {
                price: (SITE_FEATURES + 1) as i64,
                captured: (SITE_FEATURES + 2) as i64,
                energy: (SITE_FEATURES + ESTIMATE_SITE_NAMES.len()) as i64,
                ranks: ranks.to_vec(),
            }),
        );
        let denoiser = ddim.enabled.then(|| {
            Denoiser::new(&(&root / "ddim"), GLOBAL_FEATURES as i64, SITE_FEATURES as i64, ddim.hidden, ddim.activation)
        });
        // Created last: the other weights start as without it.
        let defer =
            (net.defer && prior.enabled).then(|| DeferHead::new(&(&root / "defer"), 3 * net.hidden, net.hidden));
        PolicyModel {
            vs,
            net: network,
            denoiser,
            alpha_bar: ddim::alpha_bar(&ddim),
            ddim,
            norm: ObsNormalizer::new(GLOBAL_FEATURES, SITE_FEATURES),
            ranks: ranks.to_vec(),
            ddim_active: false,
            prior: prior.enabled.then(|| Prior::new(prior.clone(), ranks)),
            estimator: (net.estimates && !prior.enabled)
                .then(|| Prior::new(PriorConfig { infer: true, ..prior.clone() }, ranks)),
            estimates: net.estimates,
            loss_quantile: if prior.enabled { 0.0 } else { net.loss_quantile },
            fit: net.fit,
            defer,
        }
    }

    /// Widths of the network's global and site inputs: the observation's features, plus the
    /// estimates with `net.estimates`.
    pub fn input_dims(&self) -> (usize, usize) {
        input_dims(self.estimates, self.ranks.len())
    }

    /// The prior's values (when there is a prior), skip margins (with a skip head too) and the
    /// estimates (with `net.estimates`) of a batch, from one round model per environment:
    /// each environment's belief sees this observation once.
    pub fn prior_output(&self, obs: ObsBatch<'_>, budget: BudgetContext<'_>, beliefs: &mut [Belief]) -> PriorOutput {
        match self.prior.as_ref().or(self.estimator.as_ref()) {
            Some(p) => {
                let values = self.prior.is_some();
                let want = Want {
                    values,
                    skip: values && self.net.has_skip(),
                    estimates: self.estimates,
                    loss_quantile: self.loss_quantile,
                };
                p.evaluate(obs, budget, beliefs, want)
            }
            None => PriorOutput::default(),
        }
    }

    /// Device of the weights.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// The network's inputs for raw observations as tensors: global [N, G], sites [N, L, F],
    /// mask, and the same rows as vectors. The features are normalized; with `net.estimates`
    /// each row is followed by its estimates from `est` ([`PolicyModel::prior_output`]).
    pub fn tensors(
        &self,
        global: &[f32],
        sites: &[f32],
        n_envs: usize,
        n_sites: usize,
        est: &PriorOutput,
    ) -> (Tensor, Tensor, Tensor, Vec<f32>, Vec<f32>) {
        let mut g = global.to_vec();
        let mut s = sites.to_vec();
        self.norm.global.normalize(&mut g);
        self.norm.site.normalize(&mut s);
        let (g_dim, s_dim) = self.input_dims();
        if self.estimates {
            assert_eq!(est.est_sites.len(), n_envs * n_sites * (s_dim - SITE_FEATURES), "estimates of every site");
            g = append_rows(&g, GLOBAL_FEATURES, &est.est_global, g_dim - GLOBAL_FEATURES);
            s = append_rows(&s, SITE_FEATURES, &est.est_sites, s_dim - SITE_FEATURES);
        }
        let dev = self.device();
        let gt = Tensor::from_slice(&g).view([n_envs as i64, g_dim as i64]).to_device(dev);
        let st = Tensor::from_slice(&s).view([n_envs as i64, n_sites as i64, s_dim as i64]).to_device(dev);
        let mask = Tensor::ones([n_envs as i64, n_sites as i64], (Kind::Float, dev));
        (gt, st, mask, g, s)
    }

    /// Decides plans for a batch of raw observations. `budget.unit_cost` (per site) and
    /// `budget.budgets` (per environment, estimated) drive the feasibility projection; the prior
    /// also needs each site's min(d_in, d_out) (`budget.dims`, `Site::max_rank`) to normalize a
    /// spectrum's energy, and assumes `prior.default_dim` without it.
    ///
    /// `beliefs` holds one episode history per environment ([`Belief`]), which a prior that
    /// infers (`prior.infer`) extends with this observation; an empty slice otherwise.
    pub fn act(
        &self,
        obs: ObsBatch<'_>,
        budget: BudgetContext<'_>,
        beliefs: &mut [Belief],
        mode: ActMode<'_>,
    ) -> Decision {
        let ObsBatch { global, sites, n_envs, n_sites } = obs;
        let BudgetContext { unit_cost, budgets, .. } = budget;
        let k = self.ranks.len();
        let sampling = matches!(mode, ActMode::Sample(_));
        let est = self.prior_output(obs, budget, beliefs);
        // The budget each plan must fit: the given one, or the prior's choice for the inferred
        // risk of violating it (`prior.risk`). Sampling, the greedy plan and the masks PPO's
        // ratio uses all fit this one.
        let plan_budgets: Vec<f64> =
            if est.plan_budget.len() == n_envs { est.plan_budget.clone() } else { budgets.to_vec() };
        let budgets = plan_budgets.as_slice();
        let current = self.current_indices(sites, n_envs, n_sites);
        let skip_allowed: Vec<bool> =
            global.chunks_exact(GLOBAL_FEATURES).map(|g| g[GlobalFeature::ResourceBudget] == 0.0).collect();
        let (gt, st, mask, global, sites) = self.tensors(global, sites, n_envs, n_sites, &est);
        let PriorOutput { values: prior, skip_margin, .. } = est;
        let prior_t = (!prior.is_empty()).then(|| {
            Tensor::from_slice(&prior).view([n_envs as i64, n_sites as i64, k as i64]).to_device(self.device())
        });
        let (logits, values, skip_logit, spend_price, context) = tch::no_grad(|| {
            let out = self.net.forward(&gt, &st, &mask);
            let margin = (!skip_margin.is_empty()).then(|| Tensor::from_slice(&skip_margin).to_device(self.device()));
            let skip = out.skip_logit.map(|z| self.net.policy_skip_logit(&z, margin.as_ref()));
            let cur = self.net.needs_current().then(|| {
                let idx: Vec<i64> = current.iter().map(|&j| j as i64).collect();
                Tensor::from_slice(&idx).view([n_envs as i64, n_sites as i64]).to_device(self.device())
            });
            let logits = self.net.policy_logits(&out.logits, prior_t.as_ref(), cur.as_ref());
            let kappa = self.net.has_price().then(|| {
                Tensor::from_slice(&rank_costs(unit_cost, &self.ranks))
                    .view([1, n_sites as i64, k as i64])
                    .expand([n_envs as i64, n_sites as i64, k as i64], false)
                    .to_device(self.device())
            });
            let logits = self.net.priced(logits, out.price_logit.as_ref(), kappa.as_ref());
            let spend_price: Vec<f32> = out
                .price_logit
                .as_ref()
                .map(|z| Vec::try_from(z.softplus().to_device(Device::Cpu)).expect("f32 prices"))
                .unwrap_or_default();
            // Sampling with `net.keep` draws from the keep mixture; greedy decisions from p.
            let logits = match self.net.keep_mixture(&logits, cur.as_ref()) {
                Some(q) if sampling => q,
                _ => logits,
            };
            (logits, out.site_values, skip, spend_price, out.context)
        });
        let logp_all: Vec<f32> =
            Vec::try_from(logits.log_softmax(-1, Kind::Float).to_device(Device::Cpu).flatten(0, -1))
                .expect("f32 logits");
        let values: Vec<f32> = Vec::try_from(values.to_device(Device::Cpu).flatten(0, -1)).expect("f32 values");
        let (mut rng, branch) = match mode {
            ActMode::Sample(rng) => (Some(rng), None),
            ActMode::Greedy => (None, None),
            ActMode::Branch(branch) => (None, Some(branch)),
        };
        let mut cost = vec![0f64; n_sites * k];
        for (l, &u) in unit_cost.iter().enumerate() {
            for (j, &r) in self.ranks.iter().enumerate() {
                cost[l * k + j] = u * r as f64;
            }
        }
        // The skip decision, one per state: a Bernoulli sample when sampling, P(skip) > ½ when
        // greedy. On a fixed parameter budget the adapter exists whether or not a round is
        // played, so the environment forbids skipping: the skip head is masked there (never
        // skips, log-prob 0), which lets a policy trained on a channel act on a budget preset.
        let (skip, skip_logp): (Vec<bool>, Vec<f32>) = match skip_logit {
            None => (vec![false; n_envs], Vec::new()),
            Some(z) => {
                let z: Vec<f32> = Vec::try_from(z.to_device(Device::Cpu)).expect("f32 skip logits");
                z.iter()
                    .zip(&skip_allowed)
                    .enumerate()
                    .map(|(e, (&z, &allowed))| {
                        let p = 1.0 / (1.0 + (-z as f64).exp());
                        // The uniform is drawn even when masked: the draws stay aligned.
                        let s = match (rng.as_deref_mut(), branch) {
                            (Some(r), _) => r.random::<f64>() < p,
                            (None, Some(b)) if b[e] != Branch::Prior => b[e] == Branch::Skip,
                            (None, _) => p > 0.5,
                        };
                        if !allowed {
                            return (false, 0.0);
                        }
                        // log σ(z) and log σ(−z), stable for large |z|.
                        let lp = if s { -softplus(-z as f64) } else { -softplus(z as f64) };
                        (s, lp as f32)
                    })
                    .unzip()
            }
        };
        let mut coarse = vec![0u8; n_envs * n_sites];
        let mut logp = vec![0f32; n_envs * n_sites];
        let mut feasible = Vec::new();
        let mut offset = Vec::new();
        let mut plan = vec![0usize; n_sites];
        let mut trimmed = 0;
        let fit = self.fit;
        match rng {
            // Sampling allocates site by site (see [`sample_plan`]): the plan's probability is
            // exactly the product of the masked per-site probabilities PPO's ratio uses.
            Some(rng) => {
                feasible = vec![true; n_envs * n_sites * k];
                offset = vec![0f32; n_envs * n_sites * k];
                let mut order: Vec<usize> = (0..n_sites).collect();
                let mut priced = vec![0f32; n_sites * k];
                for e in 0..n_envs {
                    let (rows, sites_of) = (e * n_sites * k..(e + 1) * n_sites * k, e * n_sites..(e + 1) * n_sites);
                    if skip[e] {
                        coarse[sites_of.clone()].copy_from_slice(&current[sites_of]);
                        continue;
                    }
                    // Each site's categorical is priced at the budget's shadow price, so that
                    // independent choices already (nearly) fit and the masks only trim.
                    let mu = match fit.price {
                        BudgetPrice::Mode => budget_price(&logp_all[rows.clone()], &cost, k, budgets[e]),
                        BudgetPrice::Mean => budget_price_mean(&logp_all[rows.clone()], &cost, k, budgets[e]),
                    };
                    for (i, ((p, o), &lp)) in
                        priced.iter_mut().zip(&mut offset[rows.clone()]).zip(&logp_all[rows.clone()]).enumerate()
                    {
                        *o = (mu * cost[i]) as f32;
                        *p = lp - *o;
                    }
                    let first = match fit.order {
                        SiteOrder::Random => None,
                        SiteOrder::LargestFirst => Some(&current[sites_of.clone()]),
                    };
                    trimmed += sample_plan(
                        &priced,
                        &cost,
                        k,
                        budgets[e],
                        AllocationOrder { order: &mut order, largest_first: first },
                        rng,
                        SampledPlan {
                            plan: &mut coarse[sites_of.clone()],
                            logp: &mut logp[sites_of],
                            feasible: &mut feasible[rows],
                        },
                    );
                }
            }
            // Greedy: the most likely plan that fits the budget (exact MCKP over Σ log p), the
            // mode of the per-site product restricted to the budget.
            None => {
                let mut solver = envs::oracle::MckpSolver::new();
                let util: Vec<f64> = logp_all.iter().map(|&x| x as f64).collect();
                for e in 0..n_envs {
                    let sites_of = e * n_sites..(e + 1) * n_sites;
                    if skip[e] {
                        coarse[sites_of.clone()].copy_from_slice(&current[sites_of]);
                        continue;
                    }
                    let u = &util[e * n_sites * k..(e + 1) * n_sites * k];
                    if solver.solve(u, &cost, k, budgets[e], &mut plan).is_none() {
                        plan.iter_mut().for_each(|p| *p = 0);
                    }
                    for (l, &j) in plan.iter().enumerate() {
                        coarse[e * n_sites + l] = j as u8;
                        logp[e * n_sites + l] = logp_all[(e * n_sites + l) * k + j];
                    }
                }
            }
        }
        // With a defer head, a greedy decision may be handed to the prior alone (`net.defer`).
        let (mut skip, mut deferred, mut defer_inputs) = (skip, Vec::new(), Vec::new());
        if !sampling && let (Some(head), Some(u)) = (&self.defer, prior_t.as_ref()) {
            let prior_skip: Vec<bool> = (0..n_envs)
                .map(|e| skip_allowed[e] && skip_margin.get(e).is_some_and(|&m| m > 0.0) && self.net.has_skip())
                .collect();
            let prior_logp: Vec<f64> = Vec::try_from(
                self.net.prior_alone(u).log_softmax(-1, Kind::Float).to_device(Device::Cpu).flatten(0, -1),
            )
            .expect("f32 logits")
            .into_iter()
            .map(|x: f32| x as f64)
            .collect();
            let mut solver = envs::oracle::MckpSolver::new();
            let mut prior_plan = vec![0u8; n_envs * n_sites];
            for e in 0..n_envs {
                let sites_of = e * n_sites..(e + 1) * n_sites;
                if prior_skip[e] {
                    prior_plan[sites_of.clone()].copy_from_slice(&current[sites_of]);
                    continue;
                }
                let u = &prior_logp[e * n_sites * k..(e + 1) * n_sites * k];
                if solver.solve(u, &cost, k, budgets[e], &mut plan).is_none() {
                    plan.iter_mut().for_each(|p| *p = 0);
                }
                prior_plan[sites_of].iter_mut().zip(&plan).for_each(|(x, &j)| *x = j as u8);
            }
            let sent = |row: &[u8], skips: bool| -> f64 {
                if skips { 0.0 } else { row.iter().enumerate().map(|(l, &j)| cost[l * k + j as usize]).sum() }
            };
            defer_inputs = (0..n_envs)
                .map(|e| {
                    let sites_of = e * n_sites..(e + 1) * n_sites;
                    let (mine, theirs) = (&coarse[sites_of.clone()], &prior_plan[sites_of]);
                    let (a, b) = (sent(mine, skip[e]), sent(theirs, prior_skip[e]));
                    let changed = mine.iter().zip(theirs).filter(|(x, y)| x != y).count();
                    DeferInputs {
                        spend_difference: if a.max(b) > 0.0 { ((a - b) / a.max(b)) as f32 } else { 0.0 },
                        sites_changed: changed as f32 / n_sites.max(1) as f32,
                        learned_skips: skip[e] as u8 as f32,
                        prior_skips: prior_skip[e] as u8 as f32,
                    }
                })
                .collect();
            deferred = match branch {
                Some(b) => b.iter().map(|&x| x == Branch::Prior).collect(),
                None => {
                    let rows: Vec<f32> = defer_inputs.iter().flat_map(|d| d.row()).collect();
                    let inputs = Tensor::from_slice(&rows)
                        .view([n_envs as i64, DeferInputs::LEN as i64])
                        .to_device(self.device());
                    let z: Vec<f32> =
                        Vec::try_from(tch::no_grad(|| head.logit(&context, &inputs)).to_device(Device::Cpu))
                            .expect("f32 defer logits");
                    z.iter().map(|&z| z > 0.0).collect()
                }
            };
            for e in (0..n_envs).filter(|&e| deferred[e]) {
                skip[e] = prior_skip[e];
                let sites_of = e * n_sites..(e + 1) * n_sites;
                coarse[sites_of.clone()].copy_from_slice(&prior_plan[sites_of.clone()]);
                for l in sites_of {
                    logp[l] = logp_all[l * k + coarse[l] as usize];
                }
            }
        }
        // DDIM refines the coarse plan (AirLLM: PPO is credited with the coarse plan), made
        // feasible by dropping the increments the policy values least.
        let mut executed = coarse.clone();
        if let Some(r) = self.refine(&coarse, &gt, &st, &mask, n_envs, n_sites) {
            for e in (0..n_envs).filter(|&e| !skip[e] && !deferred.get(e).copied().unwrap_or(false)) {
                let rows = &logp_all[e * n_sites * k..(e + 1) * n_sites * k];
                plan.iter_mut().zip(&r[e * n_sites..(e + 1) * n_sites]).for_each(|(p, &x)| *p = x as usize);
                project_to_budget(&mut plan, rows, &cost, k, budgets[e]);
                for l in 0..n_sites {
                    executed[e * n_sites + l] = plan[l] as u8;
                }
            }
        }
        // What each environment sends, for the belief's measurement of the budget's error.
        for (e, b) in beliefs.iter_mut().enumerate().take(n_envs) {
            let sent = if skip[e] {
                0.0
            } else {
                (0..n_sites).map(|l| cost[l * k + executed[e * n_sites + l] as usize]).sum()
            };
            let g = &obs.global[e * GLOBAL_FEATURES..(e + 1) * GLOBAL_FEATURES];
            match crate::prior::estimated_budget(g, unit_cost, &self.ranks) {
                Some(reference) => b.sent(reference, sent),
                None => b.sent(0.0, 0.0),
            }
        }
        Decision {
            coarse,
            logp,
            feasible,
            offset,
            executed,
            values,
            global,
            sites,
            prior,
            skip,
            skip_allowed,
            skip_logp,
            skip_margin,
            current,
            trimmed,
            spend_price,
            deferred,
            defer_inputs,
        }
    }

    /// Each site's current rank index, read back from the raw `rank` feature (current rank /
    /// largest rank of the set): what a skipped round keeps.
    fn current_indices(&self, raw_sites: &[f32], n_envs: usize, n_sites: usize) -> Vec<u8> {
        let r_max = *self.ranks.last().unwrap_or(&1) as f32;
        (0..n_envs * n_sites)
            .map(|i| {
                let r = raw_sites[i * SITE_FEATURES..(i + 1) * SITE_FEATURES][SiteFeature::Rank] * r_max;
                let nearest = self
                    .ranks
                    .iter()
                    .enumerate()
                    .min_by(|a, b| ((*a.1 as f32) - r).abs().total_cmp(&((*b.1 as f32) - r).abs()));
                nearest.map_or(0, |(j, _)| j as u8)
            })
            .collect()
    }

    /// DDIM refinement of the coarse plans, when active: refined rank indices per site.
    fn refine(
        &self,
        coarse: &[u8],
        gt: &Tensor,
        st: &Tensor,
        mask: &Tensor,
        n_envs: usize,
        n_sites: usize,
    ) -> Option<Vec<u8>> {
        let den = self.denoiser.as_ref().filter(|_| self.ddim_active)?;
        let k = self.ranks.len();
        let enc: Vec<f32> = coarse.iter().map(|&j| ddim::encode(j as usize, k)).collect();
        let c = Tensor::from_slice(&enc).view([n_envs as i64, n_sites as i64]).to_device(self.device());
        // DDIM's starting noise comes from its own stream, seeded by the plan, so that greedy
        // evaluation is reproducible too.
        let mut noise_rng = <ChaCha8Rng as rand::SeedableRng>::seed_from_u64(
            coarse.iter().fold(0xddu64, |h, &x| h.wrapping_mul(31).wrapping_add(x as u64)),
        );
        // The refiner reads the observation's own features, the leading columns of the
        // network's inputs (the estimates, with `net.estimates`, are appended after them).
        let (gt, st) = (gt.narrow(1, 0, GLOBAL_FEATURES as i64), st.narrow(2, 0, SITE_FEATURES as i64));
        let obs = ddim::ObsTensors { global: &gt, sites: &st, mask };
        let x0 = den.sample(&self.ddim, &self.alpha_bar, &c, obs, &mut noise_rng);
        let x0: Vec<f32> = Vec::try_from(x0.to_device(Device::Cpu).flatten(0, -1)).expect("f32 x0");
        Some(x0.into_iter().map(|x| ddim::decode(x, k) as u8).collect())
    }

    /// Named tensors of the weights, sorted by name.
    pub fn weights(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Copies weights from named tensors; every variable must be present with its shape.
    pub fn load_weights(&mut self, tensors: &[(String, Tensor)]) -> Result<(), PolicyError> {
        let mut vars = self.vs.variables();
        for (name, var) in vars.iter_mut() {
            let t = tensors
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t)
                .ok_or_else(|| PolicyError::Checkpoint(format!("weight `{name}` missing")))?;
            if t.size() != var.size() {
                return Err(PolicyError::Checkpoint(format!(
                    "weight `{name}` has shape {:?}, the network expects {:?}",
                    t.size(),
                    var.size()
                )));
            }
            tch::no_grad(|| var.copy_(&t.to_device(var.device()).to_kind(var.kind())));
        }
        Ok(())
    }
}

/// Widths of a network's global and site inputs over a rank set of `k` ranks, with or without
/// the estimates.
pub fn input_dims(estimates: bool, k: usize) -> (usize, usize) {
    if estimates {
        (GLOBAL_FEATURES + ESTIMATE_GLOBAL_NAMES.len(), SITE_FEATURES + ESTIMATE_SITE_NAMES.len() + k)
    } else {
        (GLOBAL_FEATURES, SITE_FEATURES)
    }
}

/// Rows of width `a` from `left` each followed by its row of width `b` from `right`.
fn append_rows(left: &[f32], a: usize, right: &[f32], b: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(left.len() + right.len());
    for (l, r) in left.chunks_exact(a).zip(right.chunks_exact(b)) {
        out.extend_from_slice(l);
        out.extend_from_slice(r);
    }
    out
}

/// Where [`sample_plan`] writes one state's plan.
pub struct SampledPlan<'a> {
    /// Rank index per site, `n_sites`.
    pub plan: &'a mut [u8],
    /// Log-probability of each site's index under its feasibility mask, `n_sites`.
    pub logp: &'a mut [f32],
    /// Feasibility masks, `n_sites × K`.
    pub feasible: &'a mut [bool],
}

/// Samples one state's plan site by site, so that its probability is known exactly.
///
/// The sites are visited in a uniformly random order (drawn into `order`); each site's rank is
/// drawn from its categorical `softmax(logp_row)` restricted to the ranks whose cost fits the
/// budget left ([`feasible_ranks`]). Every sampled plan fits the budget, and its probability
/// given the order is Π_i p(a_i | mask_i): the masks are a deterministic function of the order
/// and the earlier choices, and the order does not depend on the policy's parameters, so PPO's
/// ratio of these products is the exact importance ratio of the executed plan. Without a
/// binding budget every mask is full and this is independent per-site sampling.
///
/// (The earlier design took the knapsack argmax of Gumbel-perturbed log-probabilities, whose
/// plan probability is not the per-site product the loss used: on the 3-site test case of
/// `tests/action_likelihood.rs` the product gave the feasible plans 0.023 of the mass while
/// they were executed every time, a total-variation distance of 0.49.)
///
/// Returns how many sites the masks trimmed: those whose masked-out ranks held more than 1 % of
/// their priced probability.
pub fn sample_plan(
    logp_rows: &[f32],
    cost: &[f64],
    k: usize,
    budget: f64,
    order: AllocationOrder<'_>,
    rng: &mut ChaCha8Rng,
    out: SampledPlan<'_>,
) -> usize {
    let AllocationOrder { order, largest_first } = order;
    order.iter_mut().enumerate().for_each(|(i, o)| *o = i);
    order.shuffle(rng);
    if let Some(current) = largest_first {
        // Stable: ties keep their shuffled order.
        order.sort_by(|&a, &b| current[b].cmp(&current[a]));
    }
    let mut remaining = budget;
    let mut trimmed = 0;
    for &l in order.iter() {
        let mask = &mut out.feasible[l * k..(l + 1) * k];
        feasible_ranks(&cost[l * k..(l + 1) * k], remaining, mask);
        let row = &logp_rows[l * k..(l + 1) * k];
        let top = row.iter().zip(mask.iter()).filter(|(_, m)| **m).map(|(&x, _)| x as f64).fold(f64::MIN, f64::max);
        let norm: f64 = row.iter().zip(mask.iter()).filter(|(_, m)| **m).map(|(&x, _)| (x as f64 - top).exp()).sum();
        let all: f64 = row.iter().map(|&x| (x as f64 - top).exp()).sum();
        trimmed += usize::from(norm < 0.99 * all);
        let mut u = rng.random::<f64>() * norm;
        let mut pick = None;
        for (j, (&x, &m)) in row.iter().zip(mask.iter()).enumerate() {
            if m {
                pick = Some(j);
                u -= (x as f64 - top).exp();
                if u < 0.0 {
                    break;
                }
            }
        }
        let j = pick.expect("a feasibility mask keeps at least one rank");
        out.plan[l] = j as u8;
        out.logp[l] = (row[j] as f64 - top - norm.ln()) as f32;
        remaining -= cost[l * k + j];
    }
    trimmed
}

/// The allocation order of [`sample_plan`]: a uniformly random permutation drawn into `order`,
/// then, with `largest_first` (each site's current rank index), stably sorted so that the sites
/// holding the largest ranks come first. The order depends on the observation and the random
/// stream only, never on the policy's parameters, so the plan's probability given the order
/// stays the product of the masked per-site probabilities.
pub struct AllocationOrder<'a> {
    /// Scratch space of `n_sites`, overwritten with the order.
    pub order: &'a mut [usize],
    /// Each site's current rank index, for [`crate::network::SiteOrder::LargestFirst`].
    pub largest_first: Option<&'a [u8]>,
}

/// Each rank's cost relative to an average site, κ_lj = (u_l ÷ mean_l u_l)·(r_j ÷ r_max), row-major
/// [L·K] for unit costs `unit_cost` [L] and the rank set `ranks`: what `net.price`'s spend level
/// multiplies (`PolicyNet::priced`). An all-largest-rank plan costs 1 per site on average, so
/// the price means the same at every site count.
pub fn rank_costs(unit_cost: &[f64], ranks: &[u32]) -> Vec<f32> {
    let mean = unit_cost.iter().sum::<f64>() / unit_cost.len().max(1) as f64;
    let r_max = ranks.iter().copied().max().unwrap_or(1).max(1) as f64;
    let mut out = Vec::with_capacity(unit_cost.len() * ranks.len());
    for &u in unit_cost {
        let share = if mean > 0.0 { u / mean } else { 1.0 };
        out.extend(ranks.iter().map(|&r| (share * r as f64 / r_max) as f32));
    }
    out
}

/// The shadow price μ ≥ 0 of [`crate::network::BudgetPrice::Mean`]: the smallest μ at which
/// the plan's expected cost, Σ_l E[cost_l] under each site's `softmax(log p − μ·cost)`, fits the
/// budget (0 when it fits unpriced). The expected cost falls monotonically in μ (its derivative
/// is minus the summed variances), so bisection finds it; when even μ → ∞ (every site at its
/// cheapest rank) does not fit, the largest μ tried.
pub fn budget_price_mean(logp_rows: &[f32], cost: &[f64], k: usize, budget: f64) -> f64 {
    let expected = |mu: f64| -> f64 {
        logp_rows
            .chunks_exact(k)
            .zip(cost.chunks_exact(k))
            .map(|(lp, c)| {
                let top = (0..k).map(|j| lp[j] as f64 - mu * c[j]).fold(f64::MIN, f64::max);
                let (mut z, mut m) = (0.0, 0.0);
                for j in 0..k {
                    let w = (lp[j] as f64 - mu * c[j] - top).exp();
                    z += w;
                    m += w * c[j];
                }
                m / z
            })
            .sum()
    };
    smallest_fitting_price(budget, 200, 1e-9, |mu| expected(mu) <= budget + 1e-9 * budget.abs().max(1.0))
}

/// The budget's shadow price μ ≥ 0 for one state: the smallest μ at which every site's most
/// likely rank under `log p − μ·cost` fits the budget together (bisection to a relative 1e-12;
/// 0 when the unpriced choices fit). Without it, site-by-site sampling of a binding budget lets
/// the first sites take their unconstrained preference and squeezes the last ones; priced, the
/// independent choices are the Lagrangian relaxation of the greedy knapsack and the masks only
/// trim. μ is a piecewise-constant function of the logits, stored with the rollout: PPO's ratio
/// uses it as a constant, which is exact wherever the update leaves μ unchanged.
pub fn budget_price(logp_rows: &[f32], cost: &[f64], k: usize, budget: f64) -> f64 {
    let fits = |mu: f64| -> bool {
        let total: f64 = logp_rows
            .chunks_exact(k)
            .zip(cost.chunks_exact(k))
            .map(|(lp, c)| {
                let j = (0..k).fold(0, |b, j| if lp[j] as f64 - mu * c[j] > lp[b] as f64 - mu * c[b] { j } else { b });
                c[j]
            })
            .sum();
        total <= budget + 1e-9 * budget.abs().max(1.0)
    };
    smallest_fitting_price(budget, 2000, 1e-12, fits)
}

/// The smallest μ ≥ 0 with `fits(μ)`, for a `fits` that is monotone in μ: 0 when μ = 0 fits,
/// otherwise an upper bracket found by doubling from 1/budget (at most `doublings` times, the
/// last value tried when none fits) and bisection to the relative tolerance `rel_tol`.
fn smallest_fitting_price(budget: f64, doublings: usize, rel_tol: f64, fits: impl Fn(f64) -> bool) -> f64 {
    if fits(0.0) {
        return 0.0;
    }
    let mut hi = 1.0 / budget.abs().max(1e-300);
    for _ in 0..doublings {
        if fits(hi) {
            break;
        }
        hi *= 2.0;
    }
    let mut lo = 0.0;
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if fits(mid) {
            hi = mid
        } else {
            lo = mid
        }
        if hi - lo <= rel_tol * hi {
            break;
        }
    }
    hi
}

/// The ranks of one site whose cost fits `remaining` (with a relative tolerance of 1e-9); when
/// none does (a rank set without a free rank), only the cheapest.
pub fn feasible_ranks(cost_row: &[f64], remaining: f64, mask: &mut [bool]) {
    let tol = 1e-9 * remaining.abs().max(1.0);
    let mut any = false;
    for (m, &c) in mask.iter_mut().zip(cost_row) {
        *m = c <= remaining + tol;
        any |= *m;
    }
    if !any {
        let cheapest = cost_row.iter().enumerate().min_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(j, _)| j);
        mask[cheapest] = true;
    }
}

/// The feasibility masks [`sample_plan`] would have used for `plan` allocated in `order`
/// (`n_sites × K`), for tests and analysis.
pub fn feasibility_masks(plan: &[u8], order: &[usize], cost: &[f64], k: usize, budget: f64) -> Vec<bool> {
    let mut masks = vec![false; plan.len() * k];
    let mut remaining = budget;
    for &l in order {
        feasible_ranks(&cost[l * k..(l + 1) * k], remaining, &mut masks[l * k..(l + 1) * k]);
        remaining -= cost[l * k + plan[l] as usize];
    }
    masks
}

/// ln(1 + eˣ) without overflow.
fn softplus(x: f64) -> f64 {
    if x > 30.0 { x } else { x.exp().ln_1p() }
}

/// A trained policy as an [`envs::RankPolicy`], for evaluation tables: greedy decisions, or
/// with `sampling` the stochastic policy PPO trained (site-by-site sampling, [`sample_plan`]),
/// seeded per episode.
pub struct TrainedPolicy<'a> {
    /// The model.
    pub model: &'a PolicyModel,
    /// Row name.
    pub label: String,
    /// Sample instead of acting greedily: (seed, episodes begun so far, the episode's stream).
    pub sampling: Option<(u64, u64, ChaCha8Rng)>,
    /// The episode's history, for a prior that infers.
    pub belief: Belief,
    /// Rounds decided so far, and how many of them were handed to the prior (`net.defer`).
    pub rounds: (u64, u64),
}

impl<'a> TrainedPolicy<'a> {
    /// The greedy policy.
    pub fn greedy(model: &'a PolicyModel, label: impl Into<String>) -> Self {
        TrainedPolicy { model, label: label.into(), sampling: None, belief: Belief::new(), rounds: (0, 0) }
    }

    /// The sampling policy; episode e draws from `derive_seed(seed, e)`.
    pub fn sampling(model: &'a PolicyModel, label: impl Into<String>, seed: u64) -> Self {
        TrainedPolicy {
            model,
            label: label.into(),
            sampling: Some((seed, 0, <ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed))),
            belief: Belief::new(),
            rounds: (0, 0),
        }
    }
}

impl RankPolicy for TrainedPolicy<'_> {
    fn name(&self) -> String {
        self.label.clone()
    }

    fn begin_episode(&mut self) {
        self.belief = Belief::new();
        if let Some((seed, e, rng)) = &mut self.sampling {
            *rng = <ChaCha8Rng as rand::SeedableRng>::seed_from_u64(envs::derive_seed(*seed, *e));
            *e += 1;
        }
    }

    fn act(&mut self, obs: &Observation, ctx: &RoundContext<'_>) -> Vec<u32> {
        self.decide(obs, ctx).unwrap_or_else(|| {
            // Without the option to skip, keep the current plan (what a skip would have kept).
            let r_max = *self.model.ranks.last().unwrap_or(&1) as f32;
            (0..obs.n_sites).map(|l| (obs.site(l)[SiteFeature::Rank] * r_max).round() as u32).collect()
        })
    }

    fn decide(&mut self, obs: &Observation, ctx: &RoundContext<'_>) -> Option<Vec<u32>> {
        let dims: Vec<u32> = ctx.sites.iter().map(|s| s.max_rank()).collect();
        let d = self.model.act(
            ObsBatch::one(obs),
            BudgetContext {
                unit_cost: ctx.unit_cost,
                budgets: &[ctx.conservative_budget],
                dims: Some(&dims),
                cost_coef: Some(ctx.cost_coef),
            },
            std::slice::from_mut(&mut self.belief),
            match &mut self.sampling {
                Some((_, _, rng)) => ActMode::Sample(rng),
                None => ActMode::Greedy,
            },
        );
        self.rounds.0 += 1;
        self.rounds.1 += d.deferred.first().copied().unwrap_or(false) as u64;
        (!d.skip[0]).then(|| d.executed.iter().map(|&j| self.model.ranks[j as usize]).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mean_price_makes_the_expected_cost_meet_a_binding_budget_and_is_zero_when_it_fits() {
        // Two sites, flat logits over ranks {0, 1, 2, 4}, unit costs 1 and 2: the unpriced
        // expected cost is 1.75 + 3.5 = 5.25.
        let ranks = [0.0, 1.0, 2.0, 4.0];
        let cost: Vec<f64> = [1.0, 2.0].iter().flat_map(|&u| ranks.iter().map(move |&r| u * r)).collect();
        let logp = vec![0f32; 8];
        assert_eq!(budget_price_mean(&logp, &cost, 4, 6.0), 0.0);
        let mu = budget_price_mean(&logp, &cost, 4, 3.0);
        let expected: f64 = cost
            .chunks_exact(4)
            .map(|c| {
                let w: Vec<f64> = c.iter().map(|&x| (-mu * x).exp()).collect();
                w.iter().zip(c).map(|(w, c)| w * c).sum::<f64>() / w.iter().sum::<f64>()
            })
            .sum();
        assert!(mu > 0.0 && (expected - 3.0).abs() < 1e-6, "mu {mu}, expected cost {expected}");
        // The mode's price is below it here: flat logits already put every argmax at rank 0.
        assert_eq!(budget_price(&logp, &cost, 4, 3.0), 0.0);
    }

    #[test]
    fn schema_mismatch_is_explained() {
        let a = Schema::current(&[0, 1, 2]);
        let b = Schema::current(&[0, 1, 2, 4]);
        assert!(a.check_compatible(&b).unwrap_err().to_string().contains("[0, 1, 2, 4]"));
        let mut c = Schema::current(&[0, 1, 2]);
        c.site_features.pop();
        assert!(a.check_compatible(&c).unwrap_err().to_string().contains("observation schema differs"));
        assert!(a.check_compatible(&a.clone()).is_ok());
    }
}
