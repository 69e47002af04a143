//! The controller: a real fine-tuning run steered round by round by a [`RankScheduler`], with the
//! resource simulated beside it.
//!
//! # One round
//! 1. The resource draws the round's true budget and its noisy estimate ([`RunResource`], the
//!    environments' own channel / compute models, seeded by `--seed`).
//! 2. The run's signals become an observation in the environments' schema ([`observe`]) and the
//!    scheduler returns a [`RankPlan`]; the loop applies it (grow / QR-core squeeze).
//! 3. The round's optimizer steps run.
//! 4. The adapter is sent: its cost is Σ_l r_l·u_l (bits for a channel: parameters × bits per
//!    parameter). If it exceeds the true budget the round is **lost** (AirLLM): every site goes
//!    back to its state before the round (ranks, factors, optimizer and importance state), as
//!    the server never received the update. The bits were still spent.
//!
//! Without a resource (`--env none`) nothing is lost and no cost is charged; the observation then
//! describes a fixed parameter budget.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Result, bail};
use envs::observation::{self, BudgetRatioLags, GlobalValues, SiteValues};
use envs::presets::BudgetUnit;
use envs::resource::ResourceState;
use envs::{EnvPreset, EnvSpec, Observation, RoundContext};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::scheduler::{BudgetSpec, RankScheduler, RoundView, SchedulerSpec};
use rankpilot_config::BadInput;
use runio::tensorboard::SummaryWriter;
use tune::finetune::{Finetuner, SiteSignals};
use tune::lora::ResizeKind;

/// A run stopped on purpose (`--stop-at-round`) after writing its checkpoint.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Interrupted(pub String);

/// The environments' role of a projection name.
pub fn role_of(projection: &str) -> envs::Role {
    match projection {
        "q_proj" => envs::Role::Q,
        "k_proj" => envs::Role::K,
        "v_proj" => envs::Role::V,
        "o_proj" => envs::Role::O,
        "gate_proj" => envs::Role::Gate,
        "up_proj" => envs::Role::Up,
        "down_proj" => envs::Role::Down,
        _ => envs::Role::Other,
    }
}

/// The run's sites as a calibration (shapes, roles and layers; `spectrum` and `sensitivity`
/// are placeholders unless measured).
pub fn sites_calibration(model: &str, signals: &[SiteSignals]) -> envs::calibration::Calibration {
    envs::calibration::Calibration {
        format_version: envs::calibration::FORMAT_VERSION,
        model: model.to_string(),
        sites: signals
            .iter()
            .map(|s| envs::calibration::CalibratedSite {
                name: s.name.clone(),
                d_in: s.d_in as u32,
                d_out: s.d_out as u32,
                role: role_of(&s.projection),
                layer: s.layer as u32,
                spectrum: vec![1.0],
                tail_energy: 0.0,
                sensitivity: 1.0,
            })
            .collect(),
    }
}

/// The resource beside a real run: the preset's resource model applied to the run's own sites.
pub struct RunResource {
    /// The environment spec with the run's sites (unit costs, static features, rank set).
    pub spec: Arc<EnvSpec>,
    /// False for `--env none`: no budget draws, nothing lost.
    pub simulate: bool,
    /// Average parameter budget of the run (caps the observation's budget for the policy).
    pub budget_params: f64,
    state: ResourceState,
    rng: ChaCha8Rng,
    hist: BudgetRatioLags,
    round: u32,
    rounds: u32,
    last_violation: bool,
    last_cost_ratio: f64,
    /// Per-site sensitivities measured by a probe before the run (a `rankpilot calibrate`
    /// file of this model and data), in the run's site order: what round 0 reads before the
    /// run has measured anything itself. `None`: round 0 reads 1 at every site.
    pub probe_sensitivity: Option<Vec<f64>>,
}

impl RunResource {
    /// Reads round 0's sensitivities from a calibration probe of this model and data (`file`,
    /// for messages), matched to the run's sites by module name. Bad input when a site of the
    /// run is missing there or a sensitivity is not a positive number.
    pub fn set_probe(
        &mut self,
        cal: &envs::calibration::Calibration,
        file: &Path,
        signals: &[SiteSignals],
    ) -> Result<()> {
        let by_name: std::collections::HashMap<&str, f64> =
            cal.sites.iter().map(|s| (s.name.as_str(), s.sensitivity)).collect();
        let mut probe = Vec::with_capacity(signals.len());
        for s in signals {
            match by_name.get(s.name.as_str()) {
                Some(&w) if w.is_finite() && w > 0.0 => probe.push(w),
                Some(&w) => bail!(BadInput(format!(
                    "{}: site `{}` has sensitivity {w}; allowed: a positive number",
                    file.display(),
                    s.name
                ))),
                None => bail!(BadInput(format!(
                    "{}: no site `{}` (the run adapts {} sites); allowed: a calibration of this model's sites (`rankpilot calibrate --model …`)",
                    file.display(),
                    s.name,
                    signals.len()
                ))),
            }
        }
        self.probe_sensitivity = Some(probe);
        Ok(())
    }

    /// `preset` is the resource preset (`None` = no resource); its sites are replaced by the run's.
    /// `ranks` overrides the preset's rank set (a policy's). Seeds the channel with `seed`.
    pub fn new(
        preset: Option<&EnvPreset>,
        signals: &[SiteSignals],
        ranks: Option<&[u32]>,
        rounds: usize,
        budget_params: f64,
        seed: u64,
    ) -> Result<RunResource> {
        let simulate = preset.is_some();
        let mut p = match preset {
            Some(p) => p.clone(),
            None => {
                // A fixed parameter budget: the embedded `budget` preset counted in parameters.
                let mut p = envs::presets::load("budget")?;
                if let Some(b) = p.resource.budget.as_mut() {
                    b.unit = BudgetUnit::Params;
                }
                p
            }
        };
        match ranks {
            Some(r) => p.ranks = r.to_vec(),
            None => {
                // A classic scheduler plans any rank; the preset's rank set only shapes the
                // observation, so ranks above the smallest site are dropped rather than refused.
                let smallest = signals.iter().map(|s| s.d_in.min(s.d_out) as u32).min().unwrap_or(0);
                p.ranks.retain(|&r| r <= smallest);
            }
        }
        p.calibration_data = Some(sites_calibration("run", signals));
        p.sites.calibration = Some("<the run's sites>".into());
        let spec = EnvSpec::new(&p).map_err(|e| {
            BadInput(format!("resource preset `{}` on this model's {} sites: {e}", p.name, signals.len()))
        })?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut state = ResourceState::default();
        spec.resource.reset(&mut state, &mut rng);
        Ok(RunResource {
            spec,
            simulate,
            budget_params,
            state,
            rng,
            probe_sensitivity: None,
            hist: BudgetRatioLags::default(),
            round: 0,
            rounds: rounds as u32,
            last_violation: false,
            last_cost_ratio: 0.0,
        })
    }

    /// The resource's state between rounds (channel state, generator, budget history), for a
    /// resumable checkpoint.
    pub fn save_state(&self) -> serde_json::Value {
        serde_json::json!({
            "state": self.state, "rng": self.rng, "hist": self.hist, "round": self.round,
            "last_violation": self.last_violation, "last_cost_ratio": self.last_cost_ratio,
        })
    }

    /// Restores [`RunResource::save_state`].
    pub fn load_state(&mut self, v: &serde_json::Value) -> Result<()> {
        let get = |k: &str| v.get(k).cloned().ok_or_else(|| BadInput(format!("resume state: resource has no `{k}`")));
        let field = |e: serde_json::Error| BadInput(format!("resume state: resource: {e}"));
        self.state = serde_json::from_value(get("state")?).map_err(field)?;
        self.rng = serde_json::from_value(get("rng")?).map_err(field)?;
        self.hist = serde_json::from_value(get("hist")?).map_err(field)?;
        self.round = serde_json::from_value(get("round")?).map_err(field)?;
        self.last_violation = serde_json::from_value(get("last_violation")?).map_err(field)?;
        self.last_cost_ratio = serde_json::from_value(get("last_cost_ratio")?).map_err(field)?;
        Ok(())
    }

    /// Draws round `round`'s budget (rounds are drawn in order).
    pub fn begin_round(&mut self) {
        let spec = &self.spec;
        if self.simulate {
            spec.resource.draw_round(
                &mut self.state,
                self.round,
                self.rounds,
                spec.preset.baselines.margin,
                spec.sum_unit_cost,
                &mut self.rng,
            );
        } else {
            let b = self.param_cap();
            self.state.true_budget = b;
            self.state.est_budget = b;
            self.state.safe_budget = b;
        }
        let ratio = self.budget_ratio();
        if self.round == 0 {
            self.hist = BudgetRatioLags::filled(ratio);
        }
    }

    /// The parameter budget in the resource's unit (exact when unit costs are proportional to
    /// parameters, as for a channel or a parameter budget).
    pub fn param_cap(&self) -> f64 {
        let params: f64 = self.spec.sites.iter().map(|s| s.params_per_rank() as f64).sum();
        self.budget_params * self.spec.sum_unit_cost / params.max(f64::MIN_POSITIVE)
    }

    fn budget_ratio(&self) -> f32 {
        observation::budget_ratio(self.state.est_budget.min(self.param_cap()), self.spec.max_plan_cost)
    }

    /// The round's context for schedulers: unit costs and the estimated budgets.
    pub fn context(&self) -> RoundContext<'_> {
        RoundContext {
            rank_set: &self.spec.rank_set,
            sites: &self.spec.sites,
            unit_cost: &self.spec.unit_cost,
            resource: self.spec.resource.kind(),
            estimated_budget: self.state.est_budget,
            conservative_budget: self.state.safe_budget,
            // Without a resource nothing is sent: the parameter cap is the only limit, and
            // spending up to it has no price (a policy's prior then spends the budget where the
            // spectra say it helps, instead of trading it against a price no run pays).
            cost_coef: if self.simulate { self.spec.preset.reward.cost_coef } else { 0.0 },
            privileged: None,
        }
    }

    /// Cost of ranks `ranks` in the resource's unit.
    pub fn cost(&self, ranks: &[usize]) -> f64 {
        ranks.iter().zip(&self.spec.unit_cost).map(|(&r, u)| r as f64 * u).sum()
    }

    /// This round's true budget.
    pub fn true_budget(&self) -> f64 {
        self.state.true_budget
    }

    /// Ends the round with an adapter of cost `cost`: true if it was delivered.
    pub fn settle(&mut self, cost: f64) -> bool {
        let c = cost / self.state.true_budget.max(f64::MIN_POSITIVE);
        let delivered = !self.simulate || c <= 1.0;
        self.last_violation = !delivered;
        self.last_cost_ratio = c;
        self.end_round();
        delivered
    }

    /// Ends a skipped round: nothing was sent, so nothing was violated (as in the environments).
    pub fn settle_skipped(&mut self) {
        self.last_violation = false;
        self.last_cost_ratio = 0.0;
        self.end_round();
    }

    fn end_round(&mut self) {
        let ratio = self.budget_ratio();
        self.hist.push(ratio);
        self.round += 1;
    }
}

/// What the run has measured so far, beyond the per-site signals.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct RunState {
    /// Round index.
    pub round: usize,
    /// Rounds in the run.
    pub rounds: usize,
    /// Mean training loss of the last round (the first step's loss before any round).
    pub loss: f64,
    /// Training loss at the first step.
    pub initial_loss: f64,
    /// Normalised token entropy of the training data.
    pub token_entropy: f64,
}

/// The run's observation in the environments' schema (see [`envs::Observation`] for the
/// tables). Real-run sources: `sensitivity` = n·(site importance / Σ importance) (AdaLoRA's
/// `Ī·Ū`); `grad_norm` = n·(site gradient norm / Σ gradient norms)·√min(1, loss ratio) (the
/// environments scale it by √residual, which the loss ratio stands in for); `tail_share` =
/// σ_r² / Σ_{k≤r} σ_k² of the adapter's singular values; `token_entropy` = the data's normalised
/// unigram entropy; `oov_rate` = 0 (byte-level tokenizers have no unknown tokens).
pub fn observe(res: &RunResource, signals: &[SiteSignals], st: &RunState) -> Observation {
    let spec = &res.spec;
    let n = signals.len();
    let mut obs = Observation::zeros(n);
    let rmax = spec.rank_set.max();
    let loss_ratio = if st.initial_loss > 0.0 { st.loss / st.initial_loss } else { 1.0 };
    GlobalValues {
        resource: spec.resource.kind(),
        budget_ratio_est: res.budget_ratio(),
        budget_ratio_lags: res.hist,
        resource_level: observation::resource_level(&spec.resource, &res.state),
        bandwidth: observation::bandwidth_share(&spec.resource, &res.state, spec.max_bandwidth()),
        token_entropy: st.token_entropy.clamp(0.0, 1.0) as f32,
        // Byte-level tokenizers have no unknown tokens.
        oov_rate: 0.0,
        progress: st.round as f32 / st.rounds.max(1) as f32,
        loss_ratio: loss_ratio as f32,
        last_violation: res.last_violation,
        last_cost_ratio: res.last_cost_ratio.clamp(0.0, spec.preset.reward.violation_cost_cap) as f32,
        mean_rank: (signals.iter().map(|s| s.rank as f64).sum::<f64>() / (n as f64 * rmax as f64)) as f32,
        n_sites: n,
    }
    .write(&mut obs.global);

    let imp_sum: f64 = signals.iter().map(|s| s.importance).sum();
    let g_sum: f64 = signals.iter().map(|s| s.grad_norm).sum();
    let res_scale = loss_ratio.clamp(0.0, 1.0).sqrt();
    // Before the run has measured anything, a probe's sensitivities (if given) stand in for
    // both readings, as the simulator's first round reveals them; otherwise every site reads 1.
    let probe_sum: f64 = res.probe_sensitivity.as_ref().map_or(0.0, |p| p.iter().sum());
    let unmeasured = |l: usize| match &res.probe_sensitivity {
        Some(p) if probe_sum > 0.0 => n as f64 * p[l] / probe_sum,
        _ => 1.0,
    };
    for (l, s) in signals.iter().enumerate() {
        let sv = &s.singular_values;
        let total: f64 = sv.iter().map(|x| x * x).sum();
        let g = if g_sum > 0.0 { n as f64 * s.grad_norm / g_sum } else { unmeasured(l) };
        SiteValues {
            rank: (s.rank as f64 / rmax as f64) as f32,
            rank_log: observation::rank_log(s.rank as u32, rmax),
            static_features: spec.static_site_features(l),
            sensitivity: if imp_sum > 0.0 { (n as f64 * s.importance / imp_sum) as f32 } else { unmeasured(l) as f32 },
            grad_norm: (g * res_scale) as f32,
            tail_share: match sv.last() {
                Some(last) if s.rank > 0 && total > 0.0 => (last * last / total) as f32,
                _ => 0.0,
            },
        }
        .write(obs.site_mut(l));
    }
    obs
}

/// One round of a scheduled run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoundRecord {
    /// Round index.
    pub round: usize,
    /// First step of the round.
    pub step: usize,
    /// Ranks planned for the round.
    pub ranks: Vec<usize>,
    /// Adapter parameters of the plan.
    pub params: usize,
    /// Cost of sending the adapter (resource unit; 0 without a resource).
    pub cost: f64,
    /// The round's true budget (resource unit).
    pub budget: f64,
    /// Whether the update was lost (did not fit).
    pub lost: bool,
    /// Whether the scheduler skipped the round (nothing trained, nothing sent).
    pub skipped: bool,
    /// Mean training loss of the round (the previous round's after a skip).
    pub train_loss: f64,
    /// Time the scheduler took to plan (ms).
    pub plan_ms: f64,
}

/// The outcome of a scheduled run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    /// Scheduler name.
    pub scheduler: String,
    /// Validation loss before training.
    pub val_loss_initial: f64,
    /// Validation loss at the end.
    pub val_loss_final: f64,
    /// Total cost sent (resource unit: bits for a channel), lost rounds included.
    pub cost_sent: f64,
    /// Unit of `cost_sent`.
    pub cost_unit: String,
    /// Rounds whose update was lost.
    pub rounds_lost: usize,
    /// Rounds the scheduler skipped.
    pub rounds_skipped: usize,
    /// Mean adapter parameters over the rounds (planned).
    pub mean_params: f64,
    /// Adapter parameters at the end.
    pub final_params: usize,
    /// Wall time of the whole run (s).
    pub wall_seconds: f64,
    /// Tokens trained on (skipped and lost rounds included: they were computed).
    pub tokens: usize,
    /// (step, validation loss) of every evaluation, the one before training included.
    pub val_curve: Vec<(usize, f64)>,
    /// Per round.
    pub rounds: Vec<RoundRecord>,
}

impl RunReport {
    /// Share of site decisions, from the second round on, whose planned rank differs from the
    /// previous round's (a skipped round records the ranks it held): the real run's counterpart
    /// of `envs::EvalRow::change_rate`.
    pub fn rank_change_rate(&self) -> f64 {
        let (mut changed, mut compared) = (0usize, 0usize);
        for w in self.rounds.windows(2) {
            changed += w[0].ranks.iter().zip(&w[1].ranks).filter(|(a, b)| a != b).count();
            compared += w[1].ranks.len();
        }
        changed as f64 / compared.max(1) as f64
    }
}

/// Resumable checkpoints of a run: written at round boundaries into one directory (replaced
/// atomically each time), and read back by a resumed run.
#[derive(Debug, Clone, Default)]
pub struct Checkpointing {
    /// Where checkpoints go (`None`: none are written).
    pub dir: Option<std::path::PathBuf>,
    /// Write one at the start of every round that is a positive multiple of this.
    pub every_rounds: usize,
    /// Stop after writing the checkpoint at this round, as an interruption there would.
    pub stop_at_round: Option<usize>,
    /// Continue from this checkpoint directory.
    pub resume: Option<std::path::PathBuf>,
    /// What must be the same to resume (the run's settings), checked key by key.
    pub settings: serde_json::Value,
}

/// The files of a resumable checkpoint.
pub const RESUME_STATE: &str = "state.json";
/// Its tensors.
pub const RESUME_TENSORS: &str = "state.safetensors";

/// The loop's own state at a round boundary.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LoopState {
    round: usize,
    st: RunState,
    records: Vec<RoundRecord>,
    heat: Vec<Vec<f64>>,
    val0: f64,
    val: f64,
    /// (step, validation loss) of every evaluation so far.
    #[serde(default)]
    val_curve: Vec<(usize, f64)>,
    cost_sent: f64,
    tokens: usize,
    wall_seconds: f64,
}

fn save_checkpoint(
    dir: &std::path::Path,
    settings: &serde_json::Value,
    ls: &LoopState,
    ft: &Finetuner,
    sched: &dyn RankScheduler,
    res: &RunResource,
) -> Result<()> {
    let (ft_state, tensors) = ft.save_state();
    let v = serde_json::json!({
        "written_by": format!("rankpilot {}", env!("CARGO_PKG_VERSION")),
        "settings": settings, "loop": ls, "finetuner": ft_state, "scheduler": sched.save_state(),
        "resource": res.save_state(),
    });
    let json = serde_json::to_vec_pretty(&v)?;
    runio::checkpoint::write_dir_atomically(dir, |staged| {
        runio::checkpoint::write_safetensors(&staged.join(RESUME_TENSORS), &tensors, None)?;
        runio::checkpoint::atomic_write(&staged.join(RESUME_STATE), &json)
    })?;
    Ok(())
}

fn load_checkpoint(
    dir: &std::path::Path,
    settings: &serde_json::Value,
    ft: &mut Finetuner,
    sched: &mut dyn RankScheduler,
    res: &mut RunResource,
) -> Result<LoopState> {
    let path = dir.join(RESUME_STATE);
    let bad = |why: String| -> anyhow::Error { BadInput(format!("{}: {why}", path.display())).into() };
    let text = std::fs::read_to_string(&path).map_err(|e| bad(format!("{e} (not a resume checkpoint?)")))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    // The run must be the same run: every setting that shapes it, key by key.
    let saved = v["settings"].as_object().ok_or_else(|| bad("no `settings`".into()))?;
    for (k, now) in settings.as_object().into_iter().flatten() {
        let then = saved.get(k).unwrap_or(&serde_json::Value::Null);
        if then != now {
            return Err(bad(format!("`{k}` was {then} in the interrupted run, now {now}: allowed: the same settings")));
        }
    }
    let (tensors, _) =
        runio::checkpoint::read_safetensors(&dir.join(RESUME_TENSORS)).map_err(|e| bad(e.to_string()))?;
    let tensors: std::collections::HashMap<String, tch::Tensor> = tensors.into_iter().collect();
    ft.load_state(&v["finetuner"], &tensors).map_err(|e| bad(format!("{e:#}")))?;
    sched.load_state(&v["scheduler"]).map_err(|e| bad(format!("scheduler: {e:#}")))?;
    res.load_state(&v["resource"]).map_err(|e| bad(format!("{e:#}")))?;
    serde_json::from_value(v["loop"].clone()).map_err(|e| bad(format!("`loop`: {e}")))
}

/// Settings of a scheduled run: where its rounds start and how often it is evaluated.
#[derive(Debug, Clone, PartialEq)]
pub struct RunOptions {
    /// First step of every round, strictly increasing from 0 (each round runs to the next start,
    /// the last to the run's end).
    pub round_starts: Vec<usize>,
    /// Evaluate at the end of every round that reaches or crosses a multiple of this many steps,
    /// and at the end of the run.
    pub eval_every_steps: usize,
}

impl RunOptions {
    /// `rounds` rounds over `total_steps` steps, split evenly (round k starts at k·total/rounds).
    pub fn even(rounds: usize, total_steps: usize, eval_every_steps: usize) -> Result<RunOptions> {
        if rounds == 0 || rounds > total_steps {
            bail!(BadInput(format!("--rounds {rounds}: allowed: 1 to --steps ({total_steps})")));
        }
        Ok(RunOptions { round_starts: (0..rounds).map(|k| k * total_steps / rounds).collect(), eval_every_steps })
    }

    /// Rounds that start at 0 and at every step of `starts` inside the run (duplicates merged).
    pub fn at_steps(
        starts: impl IntoIterator<Item = usize>,
        total_steps: usize,
        eval_every_steps: usize,
    ) -> RunOptions {
        let mut round_starts: Vec<usize> = std::iter::once(0).chain(starts).filter(|&s| s < total_steps).collect();
        round_starts.sort_unstable();
        round_starts.dedup();
        RunOptions { round_starts, eval_every_steps }
    }

    /// Number of rounds.
    pub fn rounds(&self) -> usize {
        self.round_starts.len()
    }

    /// Steps `[start, end)` of round `k` in a run of `total_steps`.
    fn round_steps(&self, k: usize, total_steps: usize) -> (usize, usize) {
        (self.round_starts[k], self.round_starts.get(k + 1).copied().unwrap_or(total_steps))
    }

    /// The steps after which [`run`] measures the validation loss (besides before training): the
    /// end of every round that crosses a multiple of `eval_every_steps`, and the last step.
    pub fn eval_steps(&self, total_steps: usize) -> Vec<usize> {
        let every = self.eval_every_steps.max(1);
        (0..self.rounds())
            .filter_map(|k| {
                let (s0, s1) = self.round_steps(k, total_steps);
                (s1 / every > s0 / every || k + 1 == self.rounds()).then_some(s1)
            })
            .collect()
    }
}

/// Runs `ft` for its configured steps in `opts.rounds` rounds, asking `sched` for a plan at every
/// round boundary and settling each round with `res`. Logs to `tb` and advances `bar` by one per
/// step.
pub fn run(
    ft: &mut Finetuner,
    sched: &mut dyn RankScheduler,
    res: &mut RunResource,
    opts: &RunOptions,
    tb: &mut SummaryWriter,
    bar: &indicatif::ProgressBar,
    ckpt: &Checkpointing,
) -> Result<RunReport> {
    let t0 = Instant::now();
    let total = ft.cfg.steps;
    let rounds = opts.rounds();
    if rounds == 0
        || opts.round_starts[0] != 0
        || !opts.round_starts.windows(2).all(|w| w[0] < w[1])
        || opts.round_starts[rounds - 1] >= total
    {
        bail!(BadInput(format!(
            "round starts {:?}: allowed: strictly increasing from 0, below --steps ({total})",
            opts.round_starts
        )));
    }
    let resumed = match &ckpt.resume {
        Some(dir) => Some(load_checkpoint(dir, &ckpt.settings, ft, sched, res)?),
        None => None,
    };
    let first = resumed.as_ref().map_or(0, |l| l.round);
    let (val0, mut st, mut records, mut heat, mut val, mut val_curve, mut cost_sent, mut tokens, wall_before) =
        match resumed {
            Some(l) => (l.val0, l.st, l.records, l.heat, l.val, l.val_curve, l.cost_sent, l.tokens, l.wall_seconds),
            None => {
                let val0 = ft.evaluate();
                tb.add_scalar("val/loss", val0, 0)?;
                let entropy = ft.token_entropy();
                let st = RunState { round: 0, rounds, loss: f64::NAN, initial_loss: f64::NAN, token_entropy: entropy };
                (
                    val0,
                    st,
                    Vec::with_capacity(rounds),
                    Vec::with_capacity(rounds),
                    val0,
                    vec![(0, val0)],
                    0.0,
                    0usize,
                    0.0,
                )
            }
        };
    bar.inc(opts.round_starts.get(first).copied().unwrap_or(0) as u64);
    for round in first..rounds {
        let (s0, s1) = opts.round_steps(round, total);
        if let Some(dir) = &ckpt.dir
            && round > first
            && ckpt.every_rounds > 0
            && round % ckpt.every_rounds == 0
        {
            let ls = LoopState {
                round,
                st,
                records: records.clone(),
                heat: heat.clone(),
                val0,
                val,
                val_curve: val_curve.clone(),
                cost_sent,
                tokens,
                wall_seconds: wall_before + t0.elapsed().as_secs_f64(),
            };
            save_checkpoint(dir, &ckpt.settings, &ls, ft, sched, res)?;
            if ckpt.stop_at_round == Some(round) {
                tb.flush()?;
                bail!(Interrupted(format!(
                    "stopped at round {round} as asked; resume with --resume {}",
                    dir.display()
                )));
            }
        }
        ft.seed_round(round);
        res.begin_round();
        st.round = round;
        let signals = ft.signals(true);
        let obs = observe(res, &signals, &st);
        let tp = Instant::now();
        let plan = sched.plan(&RoundView {
            round,
            rounds,
            step: s0,
            total_steps: total,
            signals: &signals,
            observation: &obs,
            context: res.context(),
        })?;
        let plan_ms = tp.elapsed().as_secs_f64() * 1e3;
        if plan.skip {
            // Nothing is trained or sent: the adapters, optimizer state and data carry over.
            bar.inc((s1 - s0) as u64);
            res.settle_skipped();
            let params: usize = plan.ranks.iter().zip(ft.model.sites()).map(|(&r, s)| r * (s.d_in + s.d_out)).sum();
            let step = s1 as i64;
            tb.add_scalar("resource/cost", 0.0, step)?;
            tb.add_scalar("resource/cost_total", cost_sent, step)?;
            tb.add_scalar("resource/budget", res.true_budget(), step)?;
            tb.add_scalar("resource/lost", 0.0, step)?;
            tb.add_scalar("resource/skipped", 1.0, step)?;
            tb.add_scalar("ranks/adapter_params", params as f64, step)?;
            heat.push(plan.ranks.iter().map(|&r| r as f64).collect());
            records.push(RoundRecord {
                round,
                step: s0,
                ranks: plan.ranks.clone(),
                params,
                cost: 0.0,
                budget: res.true_budget(),
                lost: false,
                skipped: true,
                train_loss: st.loss,
                plan_ms,
            });
            continue;
        }
        // Only a round that can be lost needs the sites as they were before it.
        let saved = res.simulate.then(|| ft.snapshot());
        let resized = ft.resize(&plan).map_err(|e| anyhow::anyhow!("{}: round {round}: {e:#}", sched.name()))?;
        if resized.kinds.iter().any(|k| *k != ResizeKind::Unchanged) {
            tb.add_scalar("perf/resize_ms", resized.seconds * 1e3, s0 as i64)?;
        }
        let mut loss_sum = 0.0;
        // Parameters that acted, summed over the round's steps (the plan's, unless AdaLoRA's
        // allocator masks components step by step).
        let mut params_sum = 0usize;
        for step in s0..s1 {
            let stats = ft.train_step()?;
            params_sum += ft.adapter_params();
            if st.initial_loss.is_nan() {
                st.initial_loss = stats.loss;
            }
            loss_sum += stats.loss;
            tokens += stats.tokens;
            let s = step as i64 + 1;
            tb.add_scalar("train/loss", stats.loss, s)?;
            tb.add_scalar("train/grad_norm", stats.grad_norm, s)?;
            tb.add_scalar("train/lr", stats.lr, s)?;
            tb.add_scalar("perf/tokens_per_s", stats.tokens as f64 / stats.seconds, s)?;
            bar.set_message(format!(
                "{} round {}/{rounds} loss {:.3} val {val:.3}",
                sched.name(),
                round + 1,
                stats.loss
            ));
            bar.inc(1);
        }
        st.loss = loss_sum / (s1 - s0) as f64;
        let held = ft.active_ranks();
        let cost = if res.simulate { res.cost(&plan.ranks) } else { 0.0 };
        let budget = res.true_budget();
        let delivered = res.settle(res.cost(&plan.ranks));
        cost_sent += cost;
        if !delivered && let Some(saved) = saved {
            ft.restore(saved);
        }
        let params = (params_sum as f64 / (s1 - s0) as f64).round() as usize;
        let step = s1 as i64;
        tb.add_scalar("resource/cost", cost, step)?;
        tb.add_scalar("resource/cost_total", cost_sent, step)?;
        tb.add_scalar("resource/budget", budget, step)?;
        tb.add_scalar("resource/lost", (!delivered) as u8 as f64, step)?;
        tb.add_scalar("resource/skipped", 0.0, step)?;
        tb.add_scalar("ranks/total", held.iter().sum::<usize>() as f64, step)?;
        tb.add_scalar("ranks/adapter_params", params as f64, step)?;
        tb.add_histogram("ranks/sites", &held.iter().map(|&r| r as f64).collect::<Vec<_>>(), step)?;
        tb.add_scalar("scheduler/plan_ms", plan_ms, step)?;
        heat.push(held.iter().map(|&r| r as f64).collect());
        let every = opts.eval_every_steps.max(1);
        if s1 / every > s0 / every || round + 1 == rounds {
            val = ft.evaluate();
            val_curve.push((s1, val));
            tb.add_scalar("val/loss", val, step)?;
            let imp: Vec<f64> = ft.signals(false).iter().map(|x| x.importance).collect();
            tb.add_histogram("signals/importance", &imp, step)?;
            tb.add_scalar("signals/importance_mean", imp.iter().sum::<f64>() / imp.len().max(1) as f64, step)?;
        }
        records.push(RoundRecord {
            round,
            step: s0,
            ranks: held,
            params,
            cost,
            budget,
            lost: !delivered,
            skipped: false,
            train_loss: st.loss,
            plan_ms,
        });
    }
    // The rank map: sites by layer · projection against rounds, skipped and lost rounds marked;
    // into TensorBoard and as ranks.png beside the event file.
    let labels = ft.signals(false).iter().map(|x| runio::figures::site_label(x.layer, &x.projection)).collect();
    let map = runio::figures::RankMap {
        title: format!("{}: rank per site and round", sched.name()),
        sites: labels,
        rounds: records
            .iter()
            .zip(&heat)
            .map(|(r, h)| runio::figures::RoundRanks { ranks: h.clone(), skipped: r.skipped, lost: r.lost })
            .collect(),
    };
    let img = runio::figures::rank_map(&map)?;
    tb.add_image_rgb("ranks/heatmap", img.width, img.height, &img.rgb, total as i64)?;
    runio::checkpoint::atomic_write(
        &tb.path().parent().unwrap_or(std::path::Path::new(".")).join("ranks.png"),
        &runio::tensorboard::encode_png(img.width, img.height, &img.rgb)?,
    )?;
    tb.flush()?;
    let rounds_lost = records.iter().filter(|r| r.lost).count();
    let mean_params = records.iter().map(|r| r.params as f64).sum::<f64>() / rounds as f64;
    Ok(RunReport {
        scheduler: sched.name(),
        val_loss_initial: val0,
        val_loss_final: val,
        cost_sent,
        cost_unit: if res.simulate { res.spec.resource_unit().to_string() } else { "none".into() },
        rounds_lost,
        rounds_skipped: records.iter().filter(|r| r.skipped).count(),
        mean_params,
        final_params: ft.adapter_params(),
        wall_seconds: wall_before + t0.elapsed().as_secs_f64(),
        tokens,
        val_curve,
        rounds: records,
    })
}

/// A scheduler and its resource, ready to steer `ft` (whose sites start at rank 0; round 0's
/// plan sets them). The budget defaults to the uniform rank of `fixed:R`, else `rank:8`.
pub fn prepare(
    ft: &Finetuner,
    scheduler: &SchedulerSpec,
    env: Option<&EnvPreset>,
    budget: Option<BudgetSpec>,
    rounds: usize,
    seed: u64,
    device: tch::Device,
) -> Result<(Box<dyn RankScheduler>, RunResource)> {
    if *scheduler == SchedulerSpec::AdaloraSvd {
        if env.is_some() {
            bail!(BadInput(
                "adalora-svd runs without a resource (--env none): its allocator masks after every step and cannot roll back a lost round".into()
            ));
        }
        if ft.allocator.is_none() {
            bail!("adalora-svd needs a fine-tuner started with its AdaLoRA settings (SchedulerSpec::adalora_config)");
        }
    }
    let signals = ft.signals(false);
    let ppr: Vec<f64> = signals.iter().map(|s| (s.d_in + s.d_out) as f64).collect();
    let max_rank: Vec<usize> = signals.iter().map(|s| s.d_in.min(s.d_out)).collect();
    let budget = budget.unwrap_or(BudgetSpec::Rank(scheduler.fixed_rank().unwrap_or(8) as f64));
    let p = budget.params(&ppr);
    let sched = scheduler.build(&ppr, &max_rank, p, ft.cfg.steps, rounds, device)?;
    let res = RunResource::new(env, &signals, sched.rank_set(), rounds, p, seed).map_err(|e| {
        let whose = if sched.rank_set().is_some() { " (the rank set is the policy's)" } else { "" };
        BadInput(format!("{}: {e:#}{whose}", scheduler.label()))
    })?;
    Ok((sched, res))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tune::finetune::RankPlan;

    /// Rank 4 everywhere in round 0, then skips round 1, then keeps its ranks.
    struct SkipSecondRound;

    impl RankScheduler for SkipSecondRound {
        fn name(&self) -> String {
            "skip-second-round".into()
        }
        fn plan(&mut self, view: &RoundView<'_>) -> Result<RankPlan> {
            let ranks = match view.round {
                0 => vec![4; view.signals.len()],
                _ => view.signals.iter().map(|s| s.rank).collect(),
            };
            Ok(RankPlan { ranks, skip: view.round == 1 })
        }
    }

    #[test]
    fn a_skipped_round_trains_nothing_sends_nothing_and_keeps_the_adapters() {
        let mut ft = tune::testing::tiny_run(30, "0");
        let preset = envs::presets::load("wireless-rayleigh").unwrap();
        let signals = ft.signals(false);
        let ppr: f64 = signals.iter().map(|s| (s.d_in + s.d_out) as f64).sum();
        // The default preset's channel sized for a 56-site model: rank 4 on 14 small sites fits.
        let ranks = [0, 1, 2, 4, 8, 16];
        let mut res = RunResource::new(Some(&preset), &signals, Some(&ranks), 3, 8.0 * ppr, 7).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut tb = SummaryWriter::new(dir.path()).unwrap();
        let opts = RunOptions::even(3, 30, 10).unwrap();
        let bar = indicatif::ProgressBar::hidden();
        let report = run(&mut ft, &mut SkipSecondRound, &mut res, &opts, &mut tb, &bar, &Default::default()).unwrap();
        let r = &report.rounds;
        assert_eq!((report.rounds_skipped, report.rounds_lost), (1, 0));
        assert!(!r[0].skipped && r[1].skipped && !r[2].skipped);
        assert!(r[0].cost > 0.0 && r[2].cost > 0.0);
        assert_eq!(r[1].cost, 0.0, "a skipped round sends nothing");
        assert_eq!(report.cost_sent, r[0].cost + r[2].cost);
        assert_eq!(r[1].ranks, vec![4; r[1].ranks.len()], "and keeps the adapters");
        assert_eq!(r[1].train_loss, r[0].train_loss, "and trains nothing");
        // The round after the skip trains again, from where round 0 left off.
        assert!(r[2].train_loss < r[0].train_loss, "{} -> {}", r[0].train_loss, r[2].train_loss);
        assert_eq!(bar.position(), 30, "the progress bar counts the skipped steps");
    }

    #[test]
    fn a_probe_gives_round_zero_its_sensitivities_until_the_run_measures_its_own() {
        use envs::SiteFeature;
        let ft = tune::testing::tiny_run(10, "0");
        let mut signals = ft.signals(false);
        let n = signals.len();
        assert!(signals.iter().all(|s| s.importance == 0.0 && s.grad_norm == 0.0), "nothing measured yet");
        let ppr: f64 = signals.iter().map(|s| (s.d_in + s.d_out) as f64).sum();
        let mut res = RunResource::new(None, &signals, None, 3, 8.0 * ppr, 7).unwrap();
        let st = RunState { round: 0, rounds: 3, loss: f64::NAN, initial_loss: f64::NAN, token_entropy: 0.5 };
        let read = |res: &RunResource, signals: &[SiteSignals], f: SiteFeature| -> Vec<f32> {
            let obs = observe(res, signals, &st);
            (0..n).map(|l| obs.site(l)[f]).collect()
        };
        assert!(read(&res, &signals, SiteFeature::Sensitivity).iter().all(|&x| x == 1.0), "no probe: 1 everywhere");
        // The probe lists the sites in reverse order: they are matched by name.
        let mut cal = sites_calibration("probe", &signals);
        for (l, site) in cal.sites.iter_mut().enumerate() {
            site.sensitivity = (l + 1) as f64;
        }
        cal.sites.reverse();
        let file = Path::new("probe.calibration.json");
        res.set_probe(&cal, file, &signals).unwrap();
        let total = (n * (n + 1) / 2) as f64;
        let want: Vec<f32> = (0..n).map(|l| (n as f64 * (l + 1) as f64 / total) as f32).collect();
        assert_eq!(read(&res, &signals, SiteFeature::Sensitivity), want);
        assert_eq!(read(&res, &signals, SiteFeature::GradNorm), want);
        // Once the run has measured its own, the probe is not read.
        for s in &mut signals {
            s.importance = 2.0;
            s.grad_norm = 3.0;
        }
        assert!(read(&res, &signals, SiteFeature::Sensitivity).iter().all(|&x| x == 1.0));
        assert!(read(&res, &signals, SiteFeature::GradNorm).iter().all(|&x| x == 1.0));
        // A probe of other sites is bad input naming the file and the site.
        cal.sites.pop();
        let e = res.set_probe(&cal, file, &signals).unwrap_err().to_string();
        assert!(e.contains("probe.calibration.json") && e.contains(&signals[0].name) && e.contains("allowed"), "{e}");
        cal.sites[0].sensitivity = 0.0;
        cal.sites.push(sites_calibration("probe", &signals).sites.swap_remove(0));
        let e = res.set_probe(&cal, file, &signals).unwrap_err().to_string();
        assert!(e.contains("sensitivity 0") && e.contains("a positive number"), "{e}");
    }
}
