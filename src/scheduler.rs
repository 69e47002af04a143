//! Rank schedulers: at every round boundary of a fine-tuning run a [`RankScheduler`] reads the
//! run's signals (AdaLoRA importance, gradient norms, adapter spectra, and the same observation
//! the simulated environments emit) and returns the [`RankPlan`] for the next round, which the
//! loop applies with grow / QR-core squeeze ([`crate::controller`]).
//!
//! | name | what it does |
//! |---|---|
//! | `fixed` / `fixed:R` | one rank for every site (`fixed`: the largest that fits the budget) |
//! | `adalora` | AdaLoRA: cubic budget schedule from 1.5× to 1× the target (PEFT's `init_r` 12 → `target_r` 8), warm-up and final phases, components kept by a global importance ranking |
//! | `adalora-svd` | AdaLoRA as published and as PEFT implements it ([`tune::adalora`]): sites in SVD form `B (Λ ⊙ A)` with the orthogonality penalty, `Λ` masked after every step to a triplet budget falling from `init_r` = ⌈1.5 R⌉ to `target_r` = R per module; `--budget rank:R`, no resource |
//! | `squeeze` | LoRA-Squeeze in-training annealing: start at 4× the target rank, halve it in equal stages (4t → 2t → t) |
//! | `policy:<dir>` | a trained policy checkpoint acting on the run's observation, within the resource's budget |
//! | [`ResizeAt`] | `finetune --resize-at`: the ranks a user listed, at the steps listed |
//!
//! Every scheduler is held to the same **average adapter-parameter budget** `P` (`--budget`):
//! the classic schedules are scaled so that their mean over the rounds is at most `P`; the policy
//! may use at most `P` in every round.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use envs::{Observation, RoundContext};
use policies::belief::Belief;
use policies::model::{ActMode, BudgetContext, ObsBatch, PolicyModel, Schema};
use tch::Device;

use rankpilot_config::BadInput;
use runio::checkpoint;
use tune::finetune::{RankPlan, SiteSignals};

/// Scheduler names accepted by `--scheduler`, for error messages.
pub const SCHEDULER_NAMES: &str = "fixed, fixed:R, adalora, adalora-svd, squeeze, eva, policy:<checkpoint dir>, policy:<checkpoint dir>+hold, or a classic one with +skip (e.g. fixed+skip)";

/// What a scheduler sees at a round boundary.
pub struct RoundView<'a> {
    /// Round index (0-based).
    pub round: usize,
    /// Rounds in the run.
    pub rounds: usize,
    /// Optimizer steps taken so far.
    pub step: usize,
    /// Optimizer steps in the run.
    pub total_steps: usize,
    /// Per-site signals of the run (with singular values).
    pub signals: &'a [SiteSignals],
    /// The run's observation in the environments' schema.
    pub observation: &'a Observation,
    /// The resource's view of this round: unit costs and the estimated budgets.
    pub context: RoundContext<'a>,
}

/// Decides the ranks of every site at each round boundary.
pub trait RankScheduler {
    /// Name for tables and logs.
    fn name(&self) -> String;
    /// The plan for the round about to start (one rank per site, in the run's site order).
    fn plan(&mut self, view: &RoundView<'_>) -> Result<RankPlan>;
    /// What the scheduler has learned during the run, for a resumable checkpoint (`null` when
    /// its plans depend on the round's view alone).
    fn save_state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// Restores [`RankScheduler::save_state`].
    fn load_state(&mut self, _state: &serde_json::Value) -> Result<()> {
        Ok(())
    }
    /// The rank set the scheduler needs the observation built with (a policy's), if any.
    fn rank_set(&self) -> Option<&[u32]> {
        None
    }
}

/// An average adapter-parameter budget, from `--budget`: a number of parameters, or `rank:R`
/// (R × Σ_sites (d_in + d_out), the parameters of a uniform rank R).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BudgetSpec {
    /// Parameters.
    Params(f64),
    /// Uniform-rank equivalent.
    Rank(f64),
}

impl BudgetSpec {
    /// Parses `150000` or `rank:8`.
    pub fn parse(s: &str) -> Result<BudgetSpec, String> {
        let bad = || format!("`{s}`: allowed: a number of adapter parameters (e.g. 150000) or rank:R (e.g. rank:4)");
        let (v, rank) = match s.strip_prefix("rank:") {
            Some(r) => (r, true),
            None => (s, false),
        };
        let x: f64 = v.trim().parse().map_err(|_| bad())?;
        if !(x.is_finite() && x > 0.0) {
            return Err(bad());
        }
        Ok(if rank { BudgetSpec::Rank(x) } else { BudgetSpec::Params(x) })
    }

    /// The budget in parameters for sites with `params_per_rank` (d_in + d_out each).
    pub fn params(self, params_per_rank: &[f64]) -> f64 {
        match self {
            BudgetSpec::Params(p) => p,
            BudgetSpec::Rank(r) => r * params_per_rank.iter().sum::<f64>(),
        }
    }
}

/// A parsed `--scheduler` value.
#[derive(Debug, Clone, PartialEq)]
pub enum SchedulerSpec {
    /// `fixed` (rank from the budget) or `fixed:R`.
    Fixed(Option<usize>),
    /// `adalora`.
    Adalora,
    /// `adalora-svd`: PEFT's AdaLoRA in rankpilot's loop ([`SchedulerSpec::adalora_config`]).
    AdaloraSvd,
    /// `squeeze`.
    Squeeze,
    /// `eva`: EVA's rank redistribution by explained variance ([`EvaRedistribution`]); its
    /// runs start their sites with EVA ([`SchedulerSpec::needs_eva_init`]).
    Eva,
    /// `policy:<dir>`.
    Policy(PathBuf),
    /// `<classic>+skip`: the classic scheduler, skipping every round whose plan does not fit the
    /// resource's conservative estimate ([`SkipUnfit`]).
    SkipUnfit(Box<SchedulerSpec>),
    /// `policy:<dir>+hold`: the policy's round-0 plan, held for the whole run ([`HoldFirstPlan`]).
    Hold(Box<SchedulerSpec>),
}

impl SchedulerSpec {
    /// Parses a scheduler name (see [`SCHEDULER_NAMES`]).
    pub fn parse(s: &str) -> Result<SchedulerSpec, String> {
        let s = s.trim();
        let bad = || format!("unknown scheduler `{s}`: allowed: {SCHEDULER_NAMES}");
        if let Some(inner) = s.strip_suffix("+hold") {
            return match SchedulerSpec::parse(inner)? {
                policy @ SchedulerSpec::Policy(_) => Ok(SchedulerSpec::Hold(Box::new(policy))),
                _ => Err(format!(
                    "`{s}`: allowed: +hold after policy:<dir> (the classic schedulers' plans are made for every round)"
                )),
            };
        }
        if let Some(inner) = s.strip_suffix("+skip") {
            return match SchedulerSpec::parse(inner)? {
                SchedulerSpec::Policy(_)
                | SchedulerSpec::Hold(_)
                | SchedulerSpec::SkipUnfit(_)
                | SchedulerSpec::AdaloraSvd => Err(format!(
                    "`{s}`: allowed: +skip after fixed, fixed:R, adalora or squeeze (a policy decides its own skips; adalora-svd runs without a resource)"
                )),
                classic => Ok(SchedulerSpec::SkipUnfit(Box::new(classic))),
            };
        }
        match s.split_once(':') {
            None => match s {
                "fixed" => Ok(SchedulerSpec::Fixed(None)),
                "adalora" => Ok(SchedulerSpec::Adalora),
                "adalora-svd" => Ok(SchedulerSpec::AdaloraSvd),
                "squeeze" => Ok(SchedulerSpec::Squeeze),
                "eva" => Ok(SchedulerSpec::Eva),
                _ => Err(bad()),
            },
            Some(("fixed", r)) => {
                r.trim().parse().map(|r| SchedulerSpec::Fixed(Some(r))).map_err(|_| format!("`{s}`: R must be a rank"))
            }
            Some(("policy", dir)) if !dir.is_empty() => Ok(SchedulerSpec::Policy(PathBuf::from(dir))),
            _ => Err(bad()),
        }
    }

    /// Whether the scheduler reads EVA's explained variance, so that its runs must start their
    /// sites with `--init eva` (the commands then do so by default).
    pub fn needs_eva_init(&self) -> bool {
        match self {
            SchedulerSpec::Eva => true,
            SchedulerSpec::SkipUnfit(inner) | SchedulerSpec::Hold(inner) => inner.needs_eva_init(),
            _ => false,
        }
    }

    /// The AdaLoRA settings a run under `adalora-svd` starts its fine-tuner with (PEFT's
    /// schedule for `--budget rank:R`, [`tune::adalora::AdaloraConfig::peft_schedule`]; `None`
    /// for the budget is rank 8); `None` for every other scheduler.
    pub fn adalora_config(
        &self,
        budget: Option<BudgetSpec>,
        steps: usize,
    ) -> Result<Option<tune::adalora::AdaloraConfig>> {
        if *self != SchedulerSpec::AdaloraSvd {
            return Ok(None);
        }
        let r = match budget.unwrap_or(BudgetSpec::Rank(8.0)) {
            BudgetSpec::Rank(r) if r >= 1.0 && r.fract() == 0.0 => r as usize,
            b => bail!(BadInput(format!(
                "--budget {} for adalora-svd: PEFT's AdaLoRA counts its budget in rank triplets; allowed: --budget rank:R with a whole R >= 1",
                match b {
                    BudgetSpec::Rank(r) => format!("rank:{r}"),
                    BudgetSpec::Params(p) => format!("{p}"),
                }
            ))),
        };
        let cfg = tune::adalora::AdaloraConfig::peft_schedule(r, steps);
        cfg.check()?;
        Ok(Some(cfg))
    }

    /// R of `fixed:R` (also under `+skip`).
    pub fn fixed_rank(&self) -> Option<usize> {
        match self {
            SchedulerSpec::Fixed(r) => *r,
            SchedulerSpec::SkipUnfit(inner) | SchedulerSpec::Hold(inner) => inner.fixed_rank(),
            _ => None,
        }
    }

    /// Short label for tables (`policy:<dir name>`).
    pub fn label(&self) -> String {
        match self {
            SchedulerSpec::Fixed(None) => "fixed".into(),
            SchedulerSpec::Fixed(Some(r)) => format!("fixed:{r}"),
            SchedulerSpec::Adalora => "adalora".into(),
            SchedulerSpec::AdaloraSvd => "adalora-svd".into(),
            SchedulerSpec::Squeeze => "squeeze".into(),
            SchedulerSpec::Eva => "eva".into(),
            SchedulerSpec::SkipUnfit(inner) => format!("{}+skip", inner.label()),
            SchedulerSpec::Hold(inner) => format!("{}+hold", inner.label()),
            SchedulerSpec::Policy(d) => {
                let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
                match name(d).as_str() {
                    "best" => format!("policy:{}/best", d.parent().map(name).unwrap_or_default()),
                    n => format!("policy:{n}"),
                }
            }
        }
    }

    /// Builds the scheduler for sites with `params_per_rank` (d_in + d_out) and `max_rank`
    /// (min(d_in, d_out)), an average budget of `budget` parameters, and a run of `total_steps`
    /// steps in `rounds` rounds.
    pub fn build(
        &self,
        params_per_rank: &[f64],
        max_rank: &[usize],
        budget: f64,
        total_steps: usize,
        rounds: usize,
        device: Device,
    ) -> Result<Box<dyn RankScheduler>> {
        let c: f64 = params_per_rank.iter().sum();
        let uniform = |r: usize, what: &str| -> Result<()> {
            if let Some((l, m)) = max_rank.iter().enumerate().find(|(_, m)| r > **m) {
                bail!(BadInput(format!(
                    "{what}: rank {r} exceeds site {l}'s largest rank min(d_in, d_out) = {m}; allowed: a budget of at most {:.0} parameters (rank:{m})",
                    *m as f64 * c
                )));
            }
            Ok(())
        };
        Ok(match self {
            SchedulerSpec::Fixed(r) => {
                let r = match r {
                    Some(r) => {
                        if *r as f64 * c > budget * (1.0 + 1e-9) {
                            bail!(BadInput(format!(
                                "scheduler fixed:{r} uses {:.0} adapter parameters, above the budget of {budget:.0}; allowed: fixed:R with R <= {}",
                                *r as f64 * c,
                                (budget / c).floor()
                            )));
                        }
                        *r
                    }
                    None => (budget / c).floor() as usize,
                };
                if r == 0 {
                    bail!(BadInput(format!(
                        "a budget of {budget:.0} parameters is below the smallest uniform plan (rank 1 = {c:.0} parameters)"
                    )));
                }
                uniform(r, "fixed")?;
                Box::new(Fixed { rank: r, n: params_per_rank.len() })
            }
            SchedulerSpec::Adalora => {
                let s = AdaloraSchedule::for_budget(budget, c, total_steps, rounds);
                if s.init_rank == 0 {
                    bail!(BadInput(format!(
                        "a budget of {budget:.0} parameters is too small for adalora: its initial budget {:.0} is below one uniform rank ({c:.0} parameters)",
                        s.init_params
                    )));
                }
                uniform(s.init_rank, "adalora's initial rank")?;
                Box::new(Adalora { schedule: s, params_per_rank: params_per_rank.to_vec() })
            }
            SchedulerSpec::AdaloraSvd => Box::new(KeepComponents),
            SchedulerSpec::Squeeze => {
                let s = SqueezeSchedule::for_budget(budget, c, rounds);
                if s.target_rank() == 0 {
                    bail!(BadInput(format!(
                        "a budget of {budget:.0} parameters is too small for squeeze: its target rank would be 0 (needs {:.0} parameters on average for target rank 1)",
                        s.mean_factor() * c
                    )));
                }
                uniform(s.rank_at(0), "squeeze's starting rank")?;
                Box::new(Squeeze { schedule: s, n: params_per_rank.len() })
            }
            SchedulerSpec::Eva => {
                let rank = (budget / c).floor() as usize;
                if rank == 0 {
                    bail!(BadInput(format!(
                        "a budget of {budget:.0} parameters is below one uniform rank ({c:.0} parameters): too small for eva"
                    )));
                }
                Box::new(EvaRedistribution {
                    rank,
                    rho: EVA_RHO,
                    params_per_rank: params_per_rank.to_vec(),
                    max_rank: max_rank.to_vec(),
                    budget,
                    plan: None,
                })
            }
            SchedulerSpec::Policy(dir) => {
                Box::new(PolicyScheduler::load(dir, self.label(), params_per_rank.to_vec(), budget, device)?)
            }
            SchedulerSpec::SkipUnfit(inner) => Box::new(SkipUnfit {
                inner: inner.build(params_per_rank, max_rank, budget, total_steps, rounds, device)?,
            }),
            SchedulerSpec::Hold(inner) => Box::new(HoldFirstPlan {
                inner: inner.build(params_per_rank, max_rank, budget, total_steps, rounds, device)?,
                plan: None,
            }),
        })
    }
}

/// A channel-aware transmitter around a classic scheduler: it plays the inner scheduler's plan
/// when the plan fits the resource's conservative estimate and skips the round otherwise (keeps
/// the adapters, trains and sends nothing), as a policy may. The baseline that separates "knows
/// when not to send" from "allocates ranks well".
pub struct SkipUnfit {
    inner: Box<dyn RankScheduler>,
}

impl RankScheduler for SkipUnfit {
    fn name(&self) -> String {
        format!("{}+skip", self.inner.name())
    }
    fn save_state(&self) -> serde_json::Value {
        self.inner.save_state()
    }
    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        self.inner.load_state(state)
    }
    fn plan(&mut self, view: &RoundView<'_>) -> Result<RankPlan> {
        let plan = self.inner.plan(view)?;
        let cost: f64 = plan.ranks.iter().zip(view.context.unit_cost).map(|(&r, u)| r as f64 * u).sum();
        if cost > view.context.conservative_budget {
            return Ok(RankPlan { ranks: view.signals.iter().map(|s| s.rank).collect(), skip: true });
        }
        Ok(plan)
    }
}

/// A policy that decides once (`policy:<dir>+hold`): its round-0 plan is kept for the whole run,
/// as EVA keeps its redistribution. In the simulator a policy on a parameter budget plans in its
/// first round and then rarely changes a rank; a real run's early readings drift while its
/// adapters grow (a site's measured importance after one round is not the one after a hundred
/// steps), which the simulator's stationary sensitivities do not model, and a policy that reacts
/// to them undoes its own plan. Holding separates the policy's allocation from its reactions.
///
/// The held plan still answers to the resource: in a round whose conservative estimate it does
/// not fit (a slow throughput, a poor channel) it is trimmed to fit ([`trim_to_fit`]), and the
/// round is skipped only if even the smallest ranks do not fit. On a parameter budget the held
/// plan always fits, so there it is played unchanged.
pub struct HoldFirstPlan {
    inner: Box<dyn RankScheduler>,
    /// The plan once made (round 0; a resumed run reads it back).
    plan: Option<Vec<usize>>,
}

impl RankScheduler for HoldFirstPlan {
    fn name(&self) -> String {
        format!("{}+hold", self.inner.name())
    }
    fn rank_set(&self) -> Option<&[u32]> {
        self.inner.rank_set()
    }
    fn save_state(&self) -> serde_json::Value {
        serde_json::json!({ "inner": self.inner.save_state(), "plan": self.plan })
    }
    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        self.plan = serde_json::from_value(state["plan"].clone())?;
        self.inner.load_state(&state["inner"])
    }
    fn plan(&mut self, view: &RoundView<'_>) -> Result<RankPlan> {
        if let Some(plan) = &self.plan {
            return Ok(
                match trim_to_fit(
                    plan,
                    view.context.rank_set.ranks(),
                    view.context.unit_cost,
                    view.context.conservative_budget,
                ) {
                    Some(ranks) => RankPlan::new(ranks),
                    None => RankPlan { ranks: view.signals.iter().map(|s| s.rank).collect(), skip: true },
                },
            );
        }
        let first = self.inner.plan(view)?;
        if first.skip {
            // Nothing to hold yet: the adapters keep their ranks, and the next round decides.
            return Ok(first);
        }
        self.plan = Some(first.ranks.clone());
        Ok(first)
    }
}

/// The held plan `held`, trimmed until its cost (rank × `unit_cost`, summed) is at most `budget`:
/// each step moves one site down to the next rank of `ranks`, the site that keeps the largest
/// share of its held rank (ties: the one whose step saves the most), so the plan shrinks in
/// proportion and keeps its shape. No site goes below the smallest positive rank (or its held
/// rank, if smaller), since a site trimmed to 0 would lose its trained adapter. `None` when
/// even that does not fit.
pub fn trim_to_fit(held: &[usize], ranks: &[u32], unit_cost: &[f64], budget: f64) -> Option<Vec<usize>> {
    let cost = |plan: &[usize]| -> f64 { plan.iter().zip(unit_cost).map(|(&r, u)| r as f64 * u).sum() };
    let floor = ranks.iter().copied().find(|&r| r > 0).unwrap_or(0) as usize;
    let below = |r: usize| ranks.iter().rev().map(|&x| x as usize).find(|&x| x < r);
    let mut plan = held.to_vec();
    while cost(&plan) > budget {
        let step = (0..plan.len())
            .filter_map(|l| {
                let next = below(plan[l]).filter(|&x| x >= floor.min(held[l]))?;
                Some((l, next, plan[l] as f64 / held[l] as f64, (plan[l] - next) as f64 * unit_cost[l]))
            })
            .max_by(|a, b| a.2.total_cmp(&b.2).then(a.3.total_cmp(&b.3)).then(b.0.cmp(&a.0)))?;
        plan[step.0] = step.1;
    }
    Some(plan)
}

/// A hand-written schedule (`finetune --resize-at STEP:RANKS`): at each listed step the sites
/// take the listed ranks, and every other round keeps the ranks the run has. Rounds must start at
/// the listed steps ([`crate::controller::RunOptions::at_steps`]).
pub struct ResizeAt {
    /// `(step, plan)`, sorted by step; a later entry for the same step wins.
    pub plans: Vec<(usize, RankPlan)>,
}

impl RankScheduler for ResizeAt {
    fn name(&self) -> String {
        "resize-at".into()
    }
    fn plan(&mut self, view: &RoundView<'_>) -> Result<RankPlan> {
        Ok(match self.plans.iter().rev().find(|(step, _)| *step == view.step) {
            Some((_, plan)) => plan.clone(),
            None => RankPlan::new(view.signals.iter().map(|s| s.rank).collect()),
        })
    }
}

/// One rank everywhere, every round.
pub struct Fixed {
    /// The rank.
    pub rank: usize,
    n: usize,
}

impl RankScheduler for Fixed {
    fn name(&self) -> String {
        format!("fixed:{}", self.rank)
    }
    fn plan(&mut self, _: &RoundView<'_>) -> Result<RankPlan> {
        Ok(RankPlan::new(vec![self.rank; self.n]))
    }
}

/// AdaLoRA's budget schedule (PEFT's `budget_schedule`), in adapter parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct AdaloraSchedule {
    /// Initial budget (`init_bgt`).
    pub init_params: f64,
    /// Final budget (`target_bgt`).
    pub target_params: f64,
    /// Warm-up steps at the initial budget (`tinit`).
    pub tinit: usize,
    /// Final steps at the target budget (`tfinal`).
    pub tfinal: usize,
    /// Steps of the run (`total_step`).
    pub total_step: usize,
    /// Rounds of the run (the schedule is applied at round boundaries).
    pub rounds: usize,
    /// Uniform starting rank (`init_r`).
    pub init_rank: usize,
}

/// PEFT's `init_r / target_r` = 12 / 8.
pub const ADALORA_INIT_RATIO: f64 = 1.5;
/// Warm-up share of the run (`tinit / total_step`). PEFT's default is 0, which has no warm-up;
/// its quick-start example uses 500 of 3000 steps.
pub const ADALORA_TINIT: f64 = 0.1;
/// Final share of the run at the target budget (`tfinal / total_step`).
pub const ADALORA_TFINAL: f64 = 0.2;

impl AdaloraSchedule {
    /// PEFT's formula: `init` up to `tinit`, `target` after `total − tfinal`, and in between
    /// `target + (init − target)·(1 − (t − tinit)/(total − tfinal − tinit))³`.
    pub fn budget_at(&self, step: usize) -> f64 {
        let (i, f, t) = (self.tinit, self.tfinal, self.total_step);
        if step <= i {
            self.init_params
        } else if step + f > t {
            self.target_params
        } else {
            let mul = 1.0 - (step - i) as f64 / (t - f - i).max(1) as f64;
            self.target_params + (self.init_params - self.target_params) * mul.powi(3)
        }
    }

    /// The first step of round `r`.
    pub fn round_step(&self, r: usize) -> usize {
        r * self.total_step / self.rounds.max(1)
    }

    /// The schedule whose mean budget over the rounds equals `budget`, for sites with
    /// Σ (d_in + d_out) = `c`.
    pub fn for_budget(budget: f64, c: f64, total_step: usize, rounds: usize) -> AdaloraSchedule {
        let mut s = AdaloraSchedule {
            init_params: ADALORA_INIT_RATIO,
            target_params: 1.0,
            tinit: (ADALORA_TINIT * total_step as f64).round() as usize,
            tfinal: (ADALORA_TFINAL * total_step as f64).round() as usize,
            total_step,
            rounds: rounds.max(1),
            init_rank: 0,
        };
        // Budgets scale linearly: evaluate the shape at target 1, then scale.
        let mean = (0..s.rounds).map(|r| s.budget_at(s.round_step(r))).sum::<f64>() / s.rounds as f64;
        let target = budget / mean;
        s.target_params = target;
        s.init_params = ADALORA_INIT_RATIO * target;
        s.init_rank = (s.init_params / c).floor() as usize;
        s
    }
}

/// AdaLoRA: start every site at `init_r`; at each round boundary keep the components with the
/// highest importance scores (PEFT's triplet score without the λ term: `mean_j s(A_ij) +
/// mean_j s(B_ji)`, ranked globally across sites) until the scheduled budget is full.
///
/// Differences from PEFT, by design of this loop: the budget counts parameters (so every
/// scheduler is held to the same parameter budget), a site keeps its *count* of selected
/// components and is squeezed by the QR-core SVD (which keeps its top singular directions, not
/// the selected component indices), and a pruned component comes back only as a fresh one (score
/// 0, filling the budget as PEFT's top-k does).
pub struct Adalora {
    /// The budget schedule.
    pub schedule: AdaloraSchedule,
    params_per_rank: Vec<f64>,
}

impl RankScheduler for Adalora {
    fn name(&self) -> String {
        "adalora".into()
    }
    fn plan(&mut self, view: &RoundView<'_>) -> Result<RankPlan> {
        if view.round == 0 {
            return Ok(RankPlan::new(vec![self.schedule.init_rank; self.params_per_rank.len()]));
        }
        let budget = self.schedule.budget_at(self.schedule.round_step(view.round));
        Ok(RankPlan::new(adalora_keep(view.signals, self.schedule.init_rank, &self.params_per_rank, budget)))
    }
}

/// `adalora-svd`'s plan: every site keeps its components; the fine-tuner's
/// [`tune::adalora::RankAllocator`] masks them step by step.
pub struct KeepComponents;

impl RankScheduler for KeepComponents {
    fn name(&self) -> String {
        "adalora-svd".into()
    }
    fn plan(&mut self, view: &RoundView<'_>) -> Result<RankPlan> {
        Ok(RankPlan::new(view.signals.iter().map(|s| s.rank).collect()))
    }
}

/// Per site, how many of its components survive a global ranking by importance under a budget
/// of `budget` parameters (greedy: highest score first, skipping components that no longer fit).
/// Like PEFT's masked triplets, a site's components up to `init_rank` that it does not hold now
/// (pruned, or rolled back with a lost round) are candidates with score 0, so the budget is filled
/// exactly as PEFT's top-k does.
pub fn adalora_keep(signals: &[SiteSignals], init_rank: usize, params_per_rank: &[f64], budget: f64) -> Vec<usize> {
    let mut comps: Vec<(f64, usize)> = signals
        .iter()
        .enumerate()
        .flat_map(|(l, s)| {
            (0..s.rank.max(init_rank)).map(move |i| (s.component_importance.get(i).copied().unwrap_or(0.0), l))
        })
        .collect();
    // Highest score first; ties to the lower site index (deterministic).
    comps.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut keep = vec![0usize; signals.len()];
    let mut used = 0.0;
    for (_, l) in comps {
        if used + params_per_rank[l] <= budget {
            used += params_per_rank[l];
            keep[l] += 1;
        }
    }
    keep
}

/// LoRA-Squeeze's in-training rank annealing: equal stages at `t·2^(stages−1)`, …, `2t`, `t`
/// (sd-scripts' geometric sequence; the paper gives no exact sequence), each stage's rank rounded
/// down, with `t` the largest (fractional) target whose mean over the rounds fits the budget.
#[derive(Debug, Clone, PartialEq)]
pub struct SqueezeSchedule {
    /// Final rank before rounding down (the budget-filling `t`).
    pub target: f64,
    /// Number of stages (the first at `t·2^(stages−1)`).
    pub stages: usize,
    /// Rounds of the run.
    pub rounds: usize,
}

/// Stages of the squeeze schedule (4t → 2t → t).
pub const SQUEEZE_STAGES: usize = 3;

impl SqueezeSchedule {
    /// The stage of round `r`: stages split the rounds as evenly as possible.
    pub fn stage_of(&self, r: usize) -> usize {
        (r * self.stages / self.rounds.max(1)).min(self.stages - 1)
    }

    /// Rank in round `r`.
    pub fn rank_at(&self, r: usize) -> usize {
        (self.target * (1usize << (self.stages - 1 - self.stage_of(r))) as f64 + 1e-9).floor() as usize
    }

    /// The final rank.
    pub fn target_rank(&self) -> usize {
        self.rank_at(self.rounds.max(1) - 1)
    }

    /// First round at the final rank.
    pub fn target_round(&self) -> usize {
        (0..self.rounds).find(|&r| self.stage_of(r) == self.stages - 1).unwrap_or(0)
    }

    /// Mean of (unrounded stage rank)/t over the rounds.
    pub fn mean_factor(&self) -> f64 {
        (0..self.rounds).map(|r| (1usize << (self.stages - 1 - self.stage_of(r))) as f64).sum::<f64>()
            / self.rounds.max(1) as f64
    }

    /// The schedule filling `budget` on average (Σ (d_in + d_out) = `c`).
    pub fn for_budget(budget: f64, c: f64, rounds: usize) -> SqueezeSchedule {
        let mut s = SqueezeSchedule { target: 1.0, stages: SQUEEZE_STAGES, rounds: rounds.max(1) };
        s.target = budget / (c * s.mean_factor());
        s
    }
}

/// LoRA-Squeeze in-training annealing (see [`SqueezeSchedule`]); each step down is a QR-core
/// squeeze of every site.
pub struct Squeeze {
    /// The schedule.
    pub schedule: SqueezeSchedule,
    n: usize,
}

impl RankScheduler for Squeeze {
    fn name(&self) -> String {
        "squeeze".into()
    }
    fn plan(&mut self, view: &RoundView<'_>) -> Result<RankPlan> {
        Ok(RankPlan::new(vec![self.schedule.rank_at(view.round); self.n]))
    }
}

/// EVA's cap on a site's rank, as a multiple of the uniform rank (PEFT's default `rho = 2`).
pub const EVA_RHO: f64 = 2.0;

/// EVA's rank redistribution (Paischer et al. 2024; PEFT's `initialize_lora_eva_weights`): the
/// components of every site's input basis compete on their explained-variance ratio, each site
/// capped at `rho` times the uniform rank; the largest ratios win until the budget is spent.
/// PEFT counts the budget in components (`r` × sites); here it is the run's parameter budget
/// (a component of a site costs its `d_in + d_out`), so that every row of a table spends the
/// same adapter size. The plan is made once and held for the run.
pub struct EvaRedistribution {
    /// The uniform rank of the budget.
    pub rank: usize,
    /// The cap per site, in multiples of `rank`.
    pub rho: f64,
    params_per_rank: Vec<f64>,
    max_rank: Vec<usize>,
    budget: f64,
    /// The plan, once made (from the sites' bases, which do not change during a run, so a
    /// resumed run makes the same one).
    plan: Option<Vec<usize>>,
}

impl EvaRedistribution {
    /// The plan for sites whose explained-variance ratios are `variance` (descending per site).
    pub fn redistribute(&self, variance: &[&[f64]]) -> Vec<usize> {
        let cap = ((self.rank as f64 * self.rho).floor() as usize).max(self.rank);
        let mut candidates: Vec<(f64, usize, usize)> = variance
            .iter()
            .enumerate()
            .flat_map(|(i, v)| v.iter().take(cap.min(self.max_rank[i])).enumerate().map(move |(j, &x)| (x, i, j)))
            .collect();
        // Largest ratio first; ties to the earlier site and component (deterministic).
        candidates.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        let mut ranks = vec![0usize; variance.len()];
        let mut spent = 0.0;
        for (_, i, j) in candidates {
            // A site's components are taken in order (ratios descend within a site).
            if j == ranks[i] && spent + self.params_per_rank[i] <= self.budget * (1.0 + 1e-9) {
                ranks[i] += 1;
                spent += self.params_per_rank[i];
            }
        }
        ranks
    }
}

impl RankScheduler for EvaRedistribution {
    fn name(&self) -> String {
        "eva".into()
    }
    fn plan(&mut self, view: &RoundView<'_>) -> Result<RankPlan> {
        if let Some(plan) = &self.plan {
            return Ok(RankPlan::new(plan.clone()));
        }
        if let Some(s) = view.signals.iter().find(|s| s.input_variance.is_empty() && s.projection != "embed_tokens") {
            bail!(BadInput(format!(
                "scheduler eva: site `{}` has no input basis; allowed: a run with --init eva",
                s.name
            )));
        }
        let variance: Vec<&[f64]> = view.signals.iter().map(|s| s.input_variance.as_slice()).collect();
        let plan = self.redistribute(&variance);
        self.plan = Some(plan.clone());
        Ok(RankPlan::new(plan))
    }
}

/// A trained policy (`rankpilot train` checkpoint) acting greedily on the run's observation.
/// Its plan fits the resource's conservative budget estimate (the policy's own MCKP allocation)
/// and at most `budget` adapter parameters per round.
pub struct PolicyScheduler {
    model: PolicyModel,
    label: String,
    params_per_rank: Vec<f64>,
    budget: f64,
    /// The run's history, for a prior that infers.
    belief: Belief,
}

impl PolicyScheduler {
    /// Loads a policy checkpoint; errors name the directory and what would work.
    pub fn load(dir: &Path, label: String, params_per_rank: Vec<f64>, budget: f64, device: Device) -> Result<Self> {
        let (meta, tensors) = checkpoint::load(dir, checkpoint::POLICY_KIND).map_err(|e| {
            BadInput(format!(
                "scheduler policy:{}: {e:#}; allowed: a directory written by `rankpilot train`",
                dir.display()
            ))
        })?;
        let (model, cfg) = policies::trainer::policy_from_checkpoint(&meta.config, &meta.state, &tensors, device)
            .map_err(|e| BadInput(format!("policy:{}: {e}", dir.display())))?;
        cfg.schema
            .check_compatible(&Schema::current(&cfg.schema.ranks))
            .map_err(|e| BadInput(format!("policy:{}: {e}", dir.display())))?;
        Ok(PolicyScheduler { model, label, params_per_rank, budget, belief: Belief::new() })
    }
}

impl RankScheduler for PolicyScheduler {
    fn name(&self) -> String {
        self.label.clone()
    }
    fn rank_set(&self) -> Option<&[u32]> {
        Some(&self.model.ranks)
    }
    fn save_state(&self) -> serde_json::Value {
        serde_json::json!({ "belief": self.belief })
    }
    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        self.belief = serde_json::from_value(state["belief"].clone())?;
        Ok(())
    }
    fn plan(&mut self, view: &RoundView<'_>) -> Result<RankPlan> {
        let ctx = &view.context;
        let obs = view.observation;
        let set = ctx.rank_set.ranks();
        if set != self.model.ranks.as_slice() {
            bail!(BadInput(format!(
                "{}: the policy chooses from ranks {:?}, the run's rank set is {:?}",
                self.label, self.model.ranks, set
            )));
        }
        // The parameter cap in the resource's unit (exact when the unit cost is proportional to
        // the parameters, as for a channel); the repair below makes it exact in any case.
        let units_per_param: f64 =
            ctx.unit_cost.iter().sum::<f64>() / self.params_per_rank.iter().sum::<f64>().max(f64::MIN_POSITIVE);
        let budget = ctx.conservative_budget.min(self.budget * units_per_param);
        // The model-based prior (when the checkpoint has one) needs each site's real size.
        let dims: Vec<u32> = ctx.sites.iter().map(|s| s.max_rank()).collect();
        let d = self.model.act(
            ObsBatch::one(obs),
            BudgetContext {
                unit_cost: ctx.unit_cost,
                budgets: &[budget],
                dims: Some(&dims),
                cost_coef: Some(ctx.cost_coef),
            },
            std::slice::from_mut(&mut self.belief),
            ActMode::Greedy,
        );
        if d.skip[0] {
            // Keep the adapters as they are (their ranks, not the policy's reading of them).
            let ranks = view.signals.iter().map(|s| s.rank).collect();
            return Ok(RankPlan { ranks, skip: true });
        }
        let mut idx: Vec<usize> = d.executed.iter().map(|&j| j as usize).collect();
        // Repair: step the most expensive site down the rank set until the parameter cap holds.
        let params =
            |idx: &[usize]| -> f64 { idx.iter().zip(&self.params_per_rank).map(|(&j, c)| set[j] as f64 * c).sum() };
        while params(&idx) > self.budget * (1.0 + 1e-9) {
            let l = (0..idx.len())
                .filter(|&l| idx[l] > 0)
                .max_by(|&a, &b| {
                    (set[idx[a]] as f64 * self.params_per_rank[a])
                        .total_cmp(&(set[idx[b]] as f64 * self.params_per_rank[b]))
                })
                .expect("a positive plan has a positive site");
            idx[l] -= 1;
        }
        Ok(RankPlan::new(idx.iter().map(|&j| set[j] as usize).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_budgets() {
        assert_eq!(SchedulerSpec::parse("fixed:8").unwrap(), SchedulerSpec::Fixed(Some(8)));
        assert_eq!(SchedulerSpec::parse("adalora").unwrap(), SchedulerSpec::Adalora);
        assert_eq!(
            SchedulerSpec::parse("policy:checkpoints/x").unwrap(),
            SchedulerSpec::Policy("checkpoints/x".into())
        );
        let e = SchedulerSpec::parse("adalorra").unwrap_err();
        assert!(e.contains("allowed: fixed, fixed:R, adalora, adalora-svd, squeeze, eva, policy:"), "{e}");
        assert_eq!(SchedulerSpec::parse("adalora-svd").unwrap(), SchedulerSpec::AdaloraSvd);
        assert!(SchedulerSpec::parse("adalora-svd+skip").is_err());
        assert!(SchedulerSpec::parse("policy:").is_err());
        let s = SchedulerSpec::parse("fixed:4+skip").unwrap();
        assert_eq!(s, SchedulerSpec::SkipUnfit(Box::new(SchedulerSpec::Fixed(Some(4)))));
        assert_eq!((s.label(), s.fixed_rank()), ("fixed:4+skip".to_string(), Some(4)));
        let e = SchedulerSpec::parse("policy:x+skip").unwrap_err();
        assert!(e.contains("a policy decides its own skips"), "{e}");
        assert!(SchedulerSpec::parse("adalora+skip+skip").is_err());
        assert_eq!(BudgetSpec::parse("rank:4").unwrap().params(&[10.0, 20.0]), 120.0);
        assert_eq!(BudgetSpec::parse("1000").unwrap().params(&[10.0]), 1000.0);
        assert!(BudgetSpec::parse("-1").is_err() && BudgetSpec::parse("rank:x").is_err());
    }

    #[test]
    fn adalora_schedule_matches_peft_formula() {
        // total 200 steps, tinit 20, tfinal 40: b(t) = T + (I − T)(1 − (t − 20)/140)³.
        let s = AdaloraSchedule {
            init_params: 1200.0,
            target_params: 800.0,
            tinit: 20,
            tfinal: 40,
            total_step: 200,
            rounds: 20,
            init_rank: 12,
        };
        assert_eq!(s.budget_at(0), 1200.0);
        assert_eq!(s.budget_at(20), 1200.0);
        let b90 = 800.0 + 400.0 * (1.0 - 70.0 / 140.0f64).powi(3);
        assert!((s.budget_at(90) - b90).abs() < 1e-9, "{}", s.budget_at(90));
        assert!((s.budget_at(90) - 850.0).abs() < 1e-9);
        assert!((s.budget_at(160) - 800.0).abs() < 1e-9);
        assert_eq!(s.budget_at(161), 800.0);
        assert_eq!(s.budget_at(199), 800.0);
        // Scaled to a budget: the mean over the rounds equals it.
        let s = AdaloraSchedule::for_budget(1000.0, 10.0, 200, 20);
        let mean = (0..20).map(|r| s.budget_at(s.round_step(r))).sum::<f64>() / 20.0;
        assert!((mean - 1000.0).abs() < 1e-6, "{mean}");
        assert_eq!(s.tinit, 20);
        assert_eq!(s.tfinal, 40);
        assert!((s.init_params / s.target_params - 1.5).abs() < 1e-12);
    }

    #[test]
    fn squeeze_reaches_target_at_planned_round() {
        let s = SqueezeSchedule { target: 4.0, stages: 3, rounds: 20 };
        let ranks: Vec<usize> = (0..20).map(|r| s.rank_at(r)).collect();
        assert_eq!(&ranks[..7], &[16; 7]);
        assert_eq!(&ranks[7..14], &[8; 7]);
        assert_eq!(&ranks[14..], &[4; 6]);
        assert_eq!(s.target_round(), 14);
        assert_eq!(s.target_rank(), 4);
        let s = SqueezeSchedule::for_budget(100.0 * 8.0, 100.0, 20);
        // mean factor (7·4 + 7·2 + 6·1)/20 = 2.4 → t = 8 / 2.4 = 3.33: stages 13, 6, 3.
        assert!((s.mean_factor() - 2.4).abs() < 1e-12);
        assert_eq!((s.rank_at(0), s.rank_at(7), s.rank_at(19)), (13, 6, 3));
        assert_eq!(s.target_rank(), 3);
    }

    /// A round's context with an ample budget (1e9 in the resource's unit).
    fn test_context<'a>(
        set: &'a envs::RankSet,
        sites: &'a [envs::Site],
        unit: &'a [f64],
        resource: envs::presets::ResourceKind,
        cost_coef: f64,
    ) -> RoundContext<'a> {
        RoundContext {
            rank_set: set,
            sites,
            unit_cost: unit,
            resource,
            estimated_budget: 1e9,
            conservative_budget: 1e9,
            cost_coef,
            privileged: None,
        }
    }

    fn signals(ranks: &[usize], scores: &[Vec<f64>]) -> Vec<SiteSignals> {
        ranks
            .iter()
            .zip(scores)
            .enumerate()
            .map(|(l, (&r, sc))| SiteSignals {
                name: format!("s{l}"),
                layer: 0,
                projection: "q_proj".into(),
                d_in: 8,
                d_out: 8,
                rank: r,
                importance: 0.0,
                component_importance: sc.clone(),
                grad_norm: 0.0,
                singular_values: vec![],
                input_variance: vec![],
            })
            .collect()
    }

    #[test]
    fn adalora_keeps_the_globally_most_important_components_within_budget() {
        let sig = signals(&[3, 3], &[vec![5.0, 1.0, 0.5], vec![4.0, 3.0, 2.0]]);
        // Site 0 costs 10 per component, site 1 costs 20: budget 60 keeps 5 (10), 4 (20), 3 (20),
        // then 2 (20) does not fit, 1 (10) does.
        assert_eq!(adalora_keep(&sig, 3, &[10.0, 20.0], 60.0), vec![2, 2]);
        assert_eq!(adalora_keep(&sig, 3, &[10.0, 20.0], 0.0), vec![0, 0]);
        // After a lost first round every site is back at rank 0: the components come back (score 0).
        let empty = signals(&[0, 0], &[vec![], vec![]]);
        assert_eq!(adalora_keep(&empty, 3, &[10.0, 20.0], 60.0), vec![3, 1]);
    }

    #[test]
    fn classic_plans_respect_the_budget() {
        let ppr = vec![16.0, 24.0, 24.0, 40.0];
        let maxr = vec![8, 8, 8, 16];
        let c: f64 = ppr.iter().sum();
        let budget = 5.3 * c;
        let rounds = 10;
        let obs = Observation::zeros(4);
        let sites: Vec<envs::Site> = Vec::new();
        let set = envs::RankSet::new(&[0, 1, 2, 4, 8], 8).unwrap();
        let unit = vec![1.0; 4];
        for spec in [SchedulerSpec::Fixed(None), SchedulerSpec::Adalora, SchedulerSpec::Squeeze] {
            let mut s = spec.build(&ppr, &maxr, budget, 100, rounds, Device::Cpu).unwrap();
            let mut ranks = vec![0usize; 4];
            let mut total = 0.0;
            for round in 0..rounds {
                // Decreasing scores so the AdaLoRA ranking is well defined.
                let sc: Vec<Vec<f64>> = ranks
                    .iter()
                    .enumerate()
                    .map(|(l, &r)| (0..r).map(|i| 1.0 / (1 + i + l) as f64).collect())
                    .collect();
                let sig = signals(&ranks, &sc);
                let view = RoundView {
                    round,
                    rounds,
                    step: round * 10,
                    total_steps: 100,
                    signals: &sig,
                    observation: &obs,
                    context: test_context(&set, &sites, &unit, envs::presets::ResourceKind::Budget, 0.1),
                };
                let plan = s.plan(&view).unwrap();
                let p: f64 = plan.ranks.iter().zip(&ppr).map(|(&r, c)| r as f64 * c).sum();
                total += p;
                if let SchedulerSpec::Adalora = spec {
                    // Within the scheduled budget every round (1.5× the target at most).
                    assert!(p <= 1.5 * budget, "adalora round {round}: {p}");
                }
                ranks = plan.ranks;
            }
            let mean = total / rounds as f64;
            assert!(mean <= budget * (1.0 + 1e-9), "{}: mean {mean} > budget {budget}", s.name());
            assert!(mean >= 0.6 * budget, "{}: mean {mean} wastes the budget {budget}", s.name());
        }
        // Bad budgets and ranks are refused with what would work.
        let e = SchedulerSpec::Fixed(Some(9)).build(&ppr, &maxr, 1e9, 100, 10, Device::Cpu).err().unwrap();
        assert!(e.to_string().contains("largest rank"), "{e}");
        let e = SchedulerSpec::Fixed(None).build(&ppr, &maxr, 10.0, 100, 10, Device::Cpu).err().unwrap();
        assert!(e.to_string().contains("below the smallest uniform plan"), "{e}");
        let e = SchedulerSpec::Fixed(Some(6)).build(&ppr, &maxr, budget, 100, 10, Device::Cpu).err().unwrap();
        assert!(e.to_string().contains("allowed: fixed:R with R <= 5"), "{e}");
    }

    #[test]
    fn a_policy_that_skips_keeps_the_run_s_ranks() {
        // A skip head whose bias makes P(skip) ≈ 1: the plan keeps every site's actual rank
        // (3 is not even in the policy's rank set), marked as skipped.
        let ranks = [0u32, 1, 2, 4, 8];
        let model = PolicyModel::new(
            Device::Cpu,
            &ranks,
            policies::network::NetConfig { hidden: 8, skip: true, ..Default::default() },
            policies::ddim::DdimConfig::default(),
        );
        let bias = &model.vs.variables()["net.skip.bias"];
        tch::no_grad(|| {
            let _ = bias.shallow_clone().fill_(20.0);
        });
        let ppr = vec![16.0, 24.0];
        let mut s = PolicyScheduler {
            model,
            label: "policy:test".into(),
            params_per_rank: ppr.clone(),
            budget: 1e9,
            belief: Belief::new(),
        };
        let sig = signals(&[3, 8], &[vec![1.0, 0.5, 0.2], vec![1.0; 8]]);
        let obs = Observation::zeros(2);
        let sites: Vec<envs::Site> = Vec::new();
        let set = envs::RankSet::new(&ranks, 8).unwrap();
        let unit = vec![1.0; 2];
        let view = RoundView {
            round: 1,
            rounds: 4,
            step: 10,
            total_steps: 40,
            signals: &sig,
            observation: &obs,
            context: test_context(&set, &sites, &unit, envs::presets::ResourceKind::Channel, 0.1),
        };
        assert_eq!(s.plan(&view).unwrap(), RankPlan { ranks: vec![3, 8], skip: true });
        // The same policy with P(skip) ≈ 0 plays a plan from its rank set.
        let bias = &s.model.vs.variables()["net.skip.bias"];
        tch::no_grad(|| {
            let _ = bias.shallow_clone().fill_(-20.0);
        });
        let plan = s.plan(&view).unwrap();
        assert!(!plan.skip && plan.ranks.iter().all(|&r| ranks.contains(&(r as u32))), "{plan:?}");
    }

    /// A scripted inner scheduler: round k plans rank k + 1 everywhere, and skips round `skip`.
    struct Counting {
        skip: Option<usize>,
    }

    impl RankScheduler for Counting {
        fn name(&self) -> String {
            "counting".into()
        }
        fn plan(&mut self, view: &RoundView<'_>) -> Result<RankPlan> {
            let ranks = vec![view.round + 1; view.signals.len()];
            Ok(RankPlan { ranks, skip: self.skip == Some(view.round) })
        }
    }

    #[test]
    fn hold_keeps_the_policys_first_plan_for_the_whole_run() {
        let spec = SchedulerSpec::parse("policy:checkpoints/x+hold").unwrap();
        assert_eq!(spec, SchedulerSpec::Hold(Box::new(SchedulerSpec::Policy("checkpoints/x".into()))));
        assert_eq!(
            (spec.label(), spec.fixed_rank(), spec.needs_eva_init()),
            ("policy:x+hold".to_string(), None, false)
        );
        let e = SchedulerSpec::parse("fixed+hold").unwrap_err();
        assert!(e.contains("allowed: +hold after policy:<dir>"), "{e}");
        assert!(SchedulerSpec::parse("policy:x+hold+skip").unwrap_err().contains("allowed: +skip after"));
        assert!(SchedulerSpec::parse("policy:x+hold+hold").is_err());

        let obs = Observation::zeros(2);
        let sites: Vec<envs::Site> = Vec::new();
        let set = envs::RankSet::new(&[0, 1, 2, 4, 8], 8).unwrap();
        let unit = vec![1.0; 2];
        let play = |hold: &mut HoldFirstPlan, rounds: usize| -> Vec<RankPlan> {
            let mut ranks = vec![0usize; 2];
            (0..rounds)
                .map(|round| {
                    let sig = signals(&ranks, &[vec![], vec![]]);
                    let view = RoundView {
                        round,
                        rounds,
                        step: round * 10,
                        total_steps: rounds * 10,
                        signals: &sig,
                        observation: &obs,
                        context: test_context(&set, &sites, &unit, envs::presets::ResourceKind::Budget, 0.0),
                    };
                    let plan = hold.plan(&view).unwrap();
                    ranks = plan.ranks.clone();
                    plan
                })
                .collect()
        };
        let mut hold = HoldFirstPlan { inner: Box::new(Counting { skip: None }), plan: None };
        assert_eq!(hold.name(), "counting+hold");
        let plans = play(&mut hold, 4);
        assert!(plans.iter().all(|p| *p == RankPlan::new(vec![1, 1])), "{plans:?}");
        // A skipped first round holds nothing; the first played plan is held.
        let mut hold = HoldFirstPlan { inner: Box::new(Counting { skip: Some(0) }), plan: None };
        let plans = play(&mut hold, 4);
        assert_eq!(plans[0], RankPlan { ranks: vec![1, 1], skip: true });
        assert!(plans[1..].iter().all(|p| *p == RankPlan::new(vec![2, 2])), "{plans:?}");
        // A resumed run holds the saved plan.
        let mut resumed = HoldFirstPlan { inner: Box::new(Counting { skip: None }), plan: None };
        resumed.load_state(&hold.save_state()).unwrap();
        assert!(play(&mut resumed, 2).iter().all(|p| *p == RankPlan::new(vec![2, 2])));
        // A round whose conservative estimate the held plan does not fit plays it trimmed, and
        // skips (keeping the adapters' ranks) where even rank 1 everywhere does not fit.
        let sig = signals(&[2, 2], &[vec![], vec![]]);
        let round = |budget: f64| {
            let mut context = test_context(&set, &sites, &unit, envs::presets::ResourceKind::Compute, 0.0);
            context.conservative_budget = budget;
            RoundView { round: 3, rounds: 4, step: 30, total_steps: 40, signals: &sig, observation: &obs, context }
        };
        assert_eq!(resumed.plan(&round(3.0)).unwrap(), RankPlan::new(vec![1, 2]));
        assert_eq!(resumed.plan(&round(1.5)).unwrap(), RankPlan { ranks: vec![2, 2], skip: true });
        assert_eq!(resumed.plan(&round(4.0)).unwrap(), RankPlan::new(vec![2, 2]));
    }

    #[test]
    fn a_held_plan_is_trimmed_in_proportion_to_fit_a_round_it_does_not_fit() {
        let set = [0u32, 1, 2, 4, 8, 16];
        let unit = [1.0, 1.0, 2.0];
        // Fits: played as held.
        assert_eq!(trim_to_fit(&[16, 4, 2], &set, &unit, 24.0), Some(vec![16, 4, 2]));
        // 24 > 20: the site keeping the largest share of its held rank steps down first (all at
        // 1.0: the one that saves most, site 0), and one step is enough.
        assert_eq!(trim_to_fit(&[16, 4, 2], &set, &unit, 20.0), Some(vec![8, 4, 2]));
        // Further: every site halves once before any halves twice (the shape is kept).
        assert_eq!(trim_to_fit(&[16, 4, 2], &set, &unit, 12.0), Some(vec![8, 2, 1]));
        assert_eq!(trim_to_fit(&[16, 4, 2], &set, &unit, 8.0), Some(vec![4, 2, 1]));
        // No site goes below rank 1 (its adapter would be lost); a held 0 stays 0.
        assert_eq!(trim_to_fit(&[16, 0, 2], &set, &unit, 3.0), Some(vec![1, 0, 1]));
        assert_eq!(trim_to_fit(&[16, 4, 2], &set, &unit, 3.9), None);
        // Every trimmed plan fits and never exceeds the held ranks.
        for budget in [4.0, 5.0, 7.5, 13.0, 19.0, 23.9] {
            let plan = trim_to_fit(&[16, 4, 2], &set, &unit, budget).unwrap();
            let cost: f64 = plan.iter().zip(&unit).map(|(&r, u)| r as f64 * u).sum();
            assert!(cost <= budget && plan.iter().zip([16, 4, 2]).all(|(&r, h)| r <= h), "{budget}: {plan:?}");
        }
    }

    /// EVA's redistribution: components compete on explained variance across sites, each site
    /// capped at rho × the uniform rank, within the parameter budget; the plan is held.
    #[test]
    fn eva_redistributes_ranks_by_explained_variance_within_the_budget() {
        let spec = SchedulerSpec::parse("eva").unwrap();
        assert!(spec.needs_eva_init() && spec.label() == "eva");
        let eva = EvaRedistribution {
            rank: 2,
            rho: 2.0,
            params_per_rank: vec![10.0, 10.0, 20.0],
            max_rank: vec![8, 8, 3],
            budget: 2.0 * 40.0,
            plan: None,
        };
        // Site 0 concentrated, site 1 flat, site 2 in between but costlier and capped at 3.
        let v0 = [0.5, 0.3, 0.1, 0.05, 0.03];
        let v1 = [0.12, 0.11, 0.1, 0.1, 0.1];
        let v2 = [0.4, 0.35, 0.2, 0.01];
        let plan = eva.redistribute(&[&v0, &v1, &v2]);
        // Taken by ratio: 0.5 (s0), 0.4 (s2), 0.35 (s2), 0.3 (s0), 0.2 (s2, its cap of 3):
        // 2·10 + 3·20 = 80 spends the budget, so the flat site gets nothing.
        let spent: f64 = plan.iter().zip(&eva.params_per_rank).map(|(&r, c)| r as f64 * c).sum();
        assert!(spent <= 80.0, "{plan:?}");
        assert_eq!(plan, vec![2, 0, 3], "the largest ratios that fit");
        assert!(plan.iter().zip([4, 4, 3]).all(|(&r, cap)| r <= cap));
        // Once made, the plan is played as EVA plays it, whatever the round's resource: unlike a
        // held policy plan, EVA's is not trimmed to a conservative estimate.
        let mut eva = EvaRedistribution { plan: Some(plan.clone()), ..eva };
        let (obs, sites, unit) = (Observation::zeros(3), Vec::<envs::Site>::new(), vec![1.0; 3]);
        let set = envs::RankSet::new(&[0, 1, 2, 4], 8).unwrap();
        let sig = signals(&[2, 0, 3], &[vec![], vec![], vec![]]);
        let mut context = test_context(&set, &sites, &unit, envs::presets::ResourceKind::Compute, 0.0);
        context.conservative_budget = 1.0;
        let view =
            RoundView { round: 2, rounds: 4, step: 20, total_steps: 40, signals: &sig, observation: &obs, context };
        assert_eq!(eva.plan(&view).unwrap(), RankPlan::new(plan));
    }

    #[test]
    fn skip_unfit_skips_exactly_the_plans_over_the_conservative_estimate() {
        let ppr = vec![16.0, 24.0];
        let spec = SchedulerSpec::parse("fixed:2+skip").unwrap();
        let mut s = spec.build(&ppr, &[8, 8], 1e9, 40, 4, Device::Cpu).unwrap();
        assert_eq!(s.name(), "fixed:2+skip");
        let sig = signals(&[1, 1], &[vec![1.0], vec![1.0]]);
        let obs = Observation::zeros(2);
        let sites: Vec<envs::Site> = Vec::new();
        let set = envs::RankSet::new(&[0, 1, 2, 4], 8).unwrap();
        let unit = vec![3.0, 5.0];
        // fixed:2 costs 2·3 + 2·5 = 16 units.
        let mut plan_at = |budget: f64| {
            let view = RoundView {
                round: 1,
                rounds: 4,
                step: 10,
                total_steps: 40,
                signals: &sig,
                observation: &obs,
                context: RoundContext {
                    rank_set: &set,
                    sites: &sites,
                    unit_cost: &unit,
                    resource: envs::presets::ResourceKind::Channel,
                    estimated_budget: budget * 2.0,
                    conservative_budget: budget,
                    cost_coef: 0.1,
                    privileged: None,
                },
            };
            s.plan(&view).unwrap()
        };
        assert_eq!(plan_at(16.0), RankPlan::new(vec![2, 2]));
        assert_eq!(plan_at(15.9), RankPlan { ranks: vec![1, 1], skip: true });
    }
}
