//! `rankpilot._native`: the Rust parts the Python package stands on (PyO3).
//!
//! - [`VecEnv`]: `N` simulated environments of one preset stepped together with auto-reset
//!   ([`envs::VecEnv`]), with the oracle's and the uniform plan's return of every finished episode
//!   so that Python users can compute the gap closed exactly as `rankpilot eval` does;
//! - [`Policy`]: a trained checkpoint acting greedily on one observation (the CLI's decision);
//! - [`Controller`]: the scheduler and resource of a real run (`rankpilot finetune`'s loop,
//!   [`rankpilot::controller`]) for a loop that lives in Python (the `Trainer` callback): signals
//!   in, a rank plan out, the round settled against the simulated resource.
//!
//! The Gymnasium classes, the callback and the type stubs are Python (`python/rankpilot/`).
//! Observations are copied once per step from the simulator's buffers into fresh NumPy arrays:
//! a view of the buffers would change under the caller at the next step.

use std::path::PathBuf;
use std::sync::Arc;

use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use envs::observation::{GLOBAL_NAMES, SITE_NAMES};
use envs::policy::{OraclePolicy, UniformPolicy};
use envs::presets::ResourceKind;
use envs::{EnvSpec, GLOBAL_FEATURES, Observation, SITE_FEATURES, VecEnvSnapshot};
use policies::belief::Belief;
use policies::model::{ActMode, BudgetContext, ObsBatch, PolicyModel};
use rankpilot::controller::{RunResource, RunState, observe};
use rankpilot::scheduler::{AdaloraSchedule, BudgetSpec, RankScheduler, RoundView, SchedulerSpec, SqueezeSchedule};
use runio::checkpoint;
use tune::finetune::SiteSignals;

/// Bad input (a preset, a checkpoint, an action of the wrong shape) is a `ValueError`.
fn bad(e: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// An `anyhow` error from the scheduler side: bad input is a `ValueError`, the rest a
/// `RuntimeError` (as the CLI's exit codes 2 and 1).
fn from_anyhow(e: anyhow::Error) -> PyErr {
    let is_bad = e.chain().any(|c| {
        c.downcast_ref::<rankpilot_config::BadInput>().is_some()
            || c.downcast_ref::<envs::EnvError>().is_some()
            || c.downcast_ref::<policies::PolicyError>().is_some_and(policies::PolicyError::is_bad_input)
    });
    if is_bad { PyValueError::new_err(format!("{e:#}")) } else { PyRuntimeError::new_err(format!("{e:#}")) }
}

fn resource_name(kind: ResourceKind) -> &'static str {
    match kind {
        ResourceKind::Channel => "channel",
        ResourceKind::Compute => "compute",
        ResourceKind::Budget => "budget",
    }
}

/// What a policy may use besides the observation in one environment's round: the rank set, the
/// sites' sizes, the cost of a rank unit per site, the round's estimated budgets and the price of
/// the resource (an owned copy of [`envs::RoundContext`]).
#[pyclass(module = "rankpilot._native", frozen, eq)]
#[derive(Clone, PartialEq)]
struct RoundContext {
    #[pyo3(get)]
    ranks: Vec<u32>,
    #[pyo3(get)]
    max_ranks: Vec<u32>,
    #[pyo3(get)]
    unit_cost: Vec<f64>,
    #[pyo3(get)]
    resource: String,
    #[pyo3(get)]
    estimated_budget: f64,
    #[pyo3(get)]
    conservative_budget: f64,
    #[pyo3(get)]
    cost_coef: f64,
}

impl RoundContext {
    fn of(c: &envs::RoundContext<'_>) -> Self {
        RoundContext {
            ranks: c.rank_set.ranks().to_vec(),
            max_ranks: c.sites.iter().map(|s| s.max_rank()).collect(),
            unit_cost: c.unit_cost.to_vec(),
            resource: resource_name(c.resource).to_string(),
            estimated_budget: c.estimated_budget,
            conservative_budget: c.conservative_budget,
            cost_coef: c.cost_coef,
        }
    }
}

#[pymethods]
impl RoundContext {
    /// A context from its parts (what `__reduce__` returns, so that contexts pickle).
    #[new]
    #[allow(clippy::too_many_arguments)]
    fn new(
        ranks: Vec<u32>,
        max_ranks: Vec<u32>,
        unit_cost: Vec<f64>,
        resource: String,
        estimated_budget: f64,
        conservative_budget: f64,
        cost_coef: f64,
    ) -> PyResult<Self> {
        if max_ranks.len() != unit_cost.len() {
            return Err(bad(format!(
                "max_ranks has {} sites, unit_cost {}: allowed: one entry per site in both",
                max_ranks.len(),
                unit_cost.len()
            )));
        }
        Ok(RoundContext { ranks, max_ranks, unit_cost, resource, estimated_budget, conservative_budget, cost_coef })
    }

    #[allow(clippy::type_complexity)]
    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
    ) -> PyResult<(Bound<'py, PyAny>, (Vec<u32>, Vec<u32>, Vec<f64>, String, f64, f64, f64))> {
        let c = slf.get();
        Ok((
            slf.get_type().into_any(),
            (
                c.ranks.clone(),
                c.max_ranks.clone(),
                c.unit_cost.clone(),
                c.resource.clone(),
                c.estimated_budget,
                c.conservative_budget,
                c.cost_coef,
            ),
        ))
    }

    fn __repr__(&self) -> String {
        format!(
            "RoundContext(resource={:?}, sites={}, conservative_budget={:.6}, cost_coef={})",
            self.resource,
            self.unit_cost.len(),
            self.conservative_budget,
            self.cost_coef
        )
    }
}

/// `num_envs` environments of one preset, stepped together, auto-resetting.
#[pyclass(module = "rankpilot._native")]
struct VecEnv {
    spec: Arc<EnvSpec>,
    env: envs::VecEnv,
    /// Each environment at the start of its current episode (for the reference returns).
    starts: Vec<VecEnvSnapshot>,
    reference_returns: bool,
    oracle: OraclePolicy,
}

impl VecEnv {
    fn capture_start(&self, i: usize) -> VecEnvSnapshot {
        let n = self.spec.n_sites();
        VecEnvSnapshot {
            preset: self.spec.preset.name.clone(),
            states: vec![self.env.state(i).clone()],
            obs_global: self.env.obs_global()[i * GLOBAL_FEATURES..(i + 1) * GLOBAL_FEATURES].to_vec(),
            obs_sites: self.env.obs_sites()[i * n * SITE_FEATURES..(i + 1) * n * SITE_FEATURES].to_vec(),
        }
    }

    /// The return of `policy` on the episode that started at `start`.
    fn replay(&mut self, start: &VecEnvSnapshot, oracle: bool) -> PyResult<f64> {
        let env = envs::VecEnv::restore(self.spec.clone(), start.clone()).map_err(bad)?;
        let summary = if oracle {
            envs::eval::play_episode(env, &mut self.oracle)
        } else {
            envs::eval::play_episode(env, &mut UniformPolicy)
        };
        Ok(summary.map_err(bad)?.episode_return)
    }

    fn observations<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        let ne = self.env.n_envs();
        let n = self.spec.n_sites();
        let g = PyArray1::from_slice(py, self.env.obs_global()).reshape([ne, GLOBAL_FEATURES])?;
        let s = PyArray1::from_slice(py, self.env.obs_sites()).reshape([ne, n, SITE_FEATURES])?;
        Ok((g.into_any(), s.into_any()))
    }
}

#[pymethods]
impl VecEnv {
    /// `num_envs` environments of `preset` (an embedded name or a .toml path); environment i
    /// starts from `derive_seed(seed, i)`, as in `rankpilot train`. With `reference_returns`,
    /// every finished episode also reports the oracle's and the uniform plan's return on the
    /// same episode (two extra episodes of simulation each).
    #[new]
    #[pyo3(signature = (preset, num_envs = 1, seed = 0, reference_returns = true))]
    fn new(preset: &str, num_envs: usize, seed: u64, reference_returns: bool) -> PyResult<Self> {
        if num_envs == 0 {
            return Err(bad("num_envs = 0: allowed: at least 1"));
        }
        let p = envs::presets::load(preset).map_err(bad)?;
        let spec = EnvSpec::new(&p).map_err(bad)?;
        let env = envs::VecEnv::from_spec(spec.clone(), num_envs, seed);
        let mut v = VecEnv { spec, env, starts: Vec::new(), reference_returns, oracle: OraclePolicy::default() };
        v.starts = (0..num_envs).map(|i| v.capture_start(i)).collect();
        Ok(v)
    }

    /// Restarts every environment (environment i from `derive_seed(seed, i)`); returns the
    /// observations `(global [num_envs, G], sites [num_envs, n_sites, S])`.
    fn reset<'py>(&mut self, py: Python<'py>, seed: u64) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        self.env = envs::VecEnv::from_spec(self.spec.clone(), self.env.n_envs(), seed);
        self.starts = (0..self.env.n_envs()).map(|i| self.capture_start(i)).collect();
        self.observations(py)
    }

    /// Restarts environment `index` alone from `seed` (exactly) and returns its observation.
    fn reset_one<'py>(
        &mut self,
        py: Python<'py>,
        index: usize,
        seed: u64,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        let ne = self.env.n_envs();
        if index >= ne {
            return Err(bad(format!("index {index}: allowed: 0 to {}", ne - 1)));
        }
        let mut snap = self.env.snapshot();
        let fresh = envs::VecEnv::from_seeds(self.spec.clone(), &[seed]).snapshot();
        let n = self.spec.n_sites();
        snap.states[index] = fresh.states[0].clone();
        snap.obs_global[index * GLOBAL_FEATURES..(index + 1) * GLOBAL_FEATURES].copy_from_slice(&fresh.obs_global);
        snap.obs_sites[index * n * SITE_FEATURES..(index + 1) * n * SITE_FEATURES].copy_from_slice(&fresh.obs_sites);
        self.env = envs::VecEnv::restore(self.spec.clone(), snap).map_err(bad)?;
        self.starts[index] = self.capture_start(index);
        let (g, s) = (fresh.obs_global, fresh.obs_sites);
        Ok((PyArray1::from_vec(py, g).into_any(), PyArray1::from_vec(py, s).reshape([n, SITE_FEATURES])?.into_any()))
    }

    /// The current observations `(global [num_envs, G], sites [num_envs, n_sites, S])`.
    fn observe<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        self.observations(py)
    }

    /// Steps every environment with rank *indices* into `ranks` (`[num_envs, n_sites]`) and,
    /// where the resource allows it, `skip` (`[num_envs]`, a skipped round keeps the adapters and
    /// sends nothing). Returns `(global, sites, rewards, dones, finished)`: the next observations
    /// (of the next episode where one ended), the rewards, which environments ended an episode,
    /// and one dict per finished episode (`env`, `return`, `final_loss`, `resource_used`,
    /// `violations`, `skips`, `rounds`, and with reference returns `oracle_return`,
    /// `uniform_return`, `gap_closed`).
    #[pyo3(signature = (indices, skip = None))]
    #[allow(clippy::type_complexity)]
    fn step<'py>(
        &mut self,
        py: Python<'py>,
        indices: PyReadonlyArray2<'py, i64>,
        skip: Option<PyReadonlyArray1<'py, bool>>,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>, Bound<'py, PyAny>, Bound<'py, PyAny>, Vec<Bound<'py, PyDict>>)>
    {
        let ne = self.env.n_envs();
        let n = self.spec.n_sites();
        let k = self.spec.rank_set.len();
        if indices.shape() != [ne, n] {
            return Err(bad(format!("action of shape {:?}: allowed: [{ne}, {n}] rank indices", indices.shape())));
        }
        let mut idx = Vec::with_capacity(ne * n);
        for &j in indices.as_array().iter() {
            if j < 0 || j as usize >= k {
                return Err(bad(format!(
                    "rank index {j}: allowed: 0 to {} (ranks {:?})",
                    k - 1,
                    self.spec.rank_set.ranks()
                )));
            }
            idx.push(j as u8);
        }
        let skip: Vec<bool> = match skip {
            Some(s) => {
                if s.shape() != [ne] {
                    return Err(bad(format!("skip of shape {:?}: allowed: [{ne}]", s.shape())));
                }
                s.as_array().iter().copied().collect()
            }
            None => vec![false; ne],
        };
        py.detach(|| self.env.step_indices_skipping(&idx, &skip)).map_err(bad)?;
        let finished: Vec<_> = self.env.finished().to_vec();
        let mut infos = Vec::with_capacity(finished.len());
        for s in finished {
            let d = PyDict::new(py);
            d.set_item("env", s.env)?;
            d.set_item("return", s.episode_return)?;
            d.set_item("final_loss", s.final_loss)?;
            d.set_item("resource_used", s.resource_used)?;
            d.set_item("violations", s.violations)?;
            d.set_item("skips", s.skips)?;
            d.set_item("rounds", s.rounds)?;
            if self.reference_returns {
                let start = self.starts[s.env].clone();
                let (o, u) = py.detach(|| -> PyResult<(f64, f64)> {
                    Ok((self.replay(&start, true)?, self.replay(&start, false)?))
                })?;
                d.set_item("oracle_return", o)?;
                d.set_item("uniform_return", u)?;
                let gap = if (o - u).abs() > 1e-12 { (s.episode_return - u) / (o - u) } else { f64::NAN };
                d.set_item("gap_closed", gap)?;
            }
            self.starts[s.env] = self.capture_start(s.env);
            infos.push(d);
        }
        let (g, st) = self.observations(py)?;
        let rewards = PyArray1::from_slice(py, self.env.rewards()).into_any();
        let dones = PyArray1::from_slice(py, self.env.dones()).into_any();
        Ok((g, st, rewards, dones, infos))
    }

    /// Environment `index`'s round context (for [`Policy::act`]).
    fn context(&self, index: usize) -> PyResult<RoundContext> {
        if index >= self.env.n_envs() {
            return Err(bad(format!("index {index}: allowed: 0 to {}", self.env.n_envs() - 1)));
        }
        Ok(RoundContext::of(&self.env.context(index)))
    }

    /// The current rank index of every site of environment `index` (what a skip keeps).
    fn rank_indices(&self, index: usize) -> PyResult<Vec<u8>> {
        if index >= self.env.n_envs() {
            return Err(bad(format!("index {index}: allowed: 0 to {}", self.env.n_envs() - 1)));
        }
        Ok(self.env.rank_indices(index).to_vec())
    }

    /// The oracle's plan (rank values) for environment `index` this round (privileged).
    fn oracle_plan(&mut self, index: usize) -> PyResult<Vec<u32>> {
        if index >= self.env.n_envs() {
            return Err(bad(format!("index {index}: allowed: 0 to {}", self.env.n_envs() - 1)));
        }
        Ok(self.env.oracle_plan(index).0)
    }

    /// Environments in the batch.
    #[getter]
    fn num_envs(&self) -> usize {
        self.env.n_envs()
    }
    /// Sites (adapted projections) per environment.
    #[getter]
    fn n_sites(&self) -> usize {
        self.spec.n_sites()
    }
    /// Rounds per episode.
    #[getter]
    fn rounds(&self) -> u32 {
        self.spec.preset.rounds
    }
    /// The rank set the rank indices point into.
    #[getter]
    fn ranks(&self) -> Vec<u32> {
        self.spec.rank_set.ranks().to_vec()
    }
    /// The preset's name.
    #[getter]
    fn preset(&self) -> String {
        self.spec.preset.name.clone()
    }
    /// `channel`, `compute` or `budget`.
    #[getter]
    fn resource(&self) -> &'static str {
        resource_name(self.spec.resource.kind())
    }
    /// Whether a round may be skipped (not on a fixed parameter budget).
    #[getter]
    fn can_skip(&self) -> bool {
        self.spec.resource.kind() != ResourceKind::Budget
    }
    /// The sites' names (e.g. `model.layers.3.self_attn.v_proj`).
    #[getter]
    fn site_names(&self) -> Vec<String> {
        self.spec.sites.iter().map(|s| s.name.clone()).collect()
    }
}

/// A trained policy checkpoint (`rankpilot train`), acting greedily as `rankpilot eval` and the
/// `policy:` scheduler do. It keeps the episode's belief between calls: call `reset()` when an
/// episode begins.
#[pyclass(module = "rankpilot._native", unsendable)]
struct Policy {
    model: PolicyModel,
    belief: Belief,
    #[pyo3(get)]
    path: PathBuf,
}

#[pymethods]
impl Policy {
    /// Loads a checkpoint directory written by `rankpilot train` (e.g. `checkpoints/default`).
    #[staticmethod]
    fn load(path: PathBuf) -> PyResult<Self> {
        let (meta, tensors) =
            checkpoint::load(&path, checkpoint::POLICY_KIND).map_err(|e| bad(format!("{}: {e}", path.display())))?;
        let (model, _cfg) =
            policies::trainer::policy_from_checkpoint(&meta.config, &meta.state, &tensors, tch::Device::Cpu)
                .map_err(|e| bad(format!("{}: {e}", path.display())))?;
        Ok(Policy { model, belief: Belief::new(), path })
    }

    /// Forgets the episode's history (call at every reset).
    fn reset(&mut self) {
        self.belief = Belief::new();
    }

    /// The rank set the policy chooses from.
    #[getter]
    fn ranks(&self) -> Vec<u32> {
        self.model.ranks.clone()
    }

    /// The plan for one observation (`global [G]`, `sites [n_sites, S]`) in `context`: the
    /// rank values, or `None` to skip the round.
    fn act(
        &mut self,
        global: PyReadonlyArray1<'_, f32>,
        sites: PyReadonlyArray2<'_, f32>,
        context: &RoundContext,
    ) -> PyResult<Option<Vec<u32>>> {
        let n = context.unit_cost.len();
        if global.shape() != [GLOBAL_FEATURES] || sites.shape() != [n, SITE_FEATURES] {
            return Err(bad(format!(
                "observation of shapes {:?} and {:?}: allowed: [{GLOBAL_FEATURES}] and [{n}, {SITE_FEATURES}] (the context's {n} sites)",
                global.shape(),
                sites.shape()
            )));
        }
        if context.ranks != self.model.ranks {
            return Err(bad(format!(
                "{}: the policy chooses from ranks {:?}, the environment's rank set is {:?}",
                self.path.display(),
                self.model.ranks,
                context.ranks
            )));
        }
        let obs = Observation {
            global: global.as_array().iter().copied().collect(),
            sites: sites.as_array().iter().copied().collect(),
            n_sites: n,
        };
        let d = self.model.act(
            ObsBatch::one(&obs),
            BudgetContext {
                unit_cost: &context.unit_cost,
                budgets: &[context.conservative_budget],
                dims: Some(&context.max_ranks),
                cost_coef: Some(context.cost_coef),
            },
            std::slice::from_mut(&mut self.belief),
            ActMode::Greedy,
        );
        Ok((!d.skip[0]).then(|| d.executed.iter().map(|&j| self.model.ranks[j as usize]).collect()))
    }
}

/// One adapted projection of a real run, as the controller needs it (a dict).
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
struct SiteShape {
    name: String,
    layer: usize,
    projection: String,
    d_in: usize,
    d_out: usize,
}

/// One site's signals at a round boundary (a dict; see [`SiteSignals`]).
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
struct SiteReading {
    rank: usize,
    importance: f64,
    component_importance: Vec<f64>,
    grad_norm: f64,
    singular_values: Vec<f64>,
}

/// The scheduler and the resource of a real run whose training loop lives in Python: at every
/// round boundary `plan()` turns the run's signals into a rank plan, and `settle()` ends the
/// round against the simulated resource (a channel may lose it), exactly as the Rust loop
/// ([`rankpilot::controller::run`]) does.
#[pyclass(module = "rankpilot._native", unsendable)]
struct Controller {
    sched: Box<dyn RankScheduler>,
    res: RunResource,
    sites: Vec<SiteShape>,
    st: RunState,
    total_steps: usize,
    #[pyo3(get)]
    budget_params: f64,
    #[pyo3(get)]
    name: String,
}

/// `adalora-svd` masks inside the model step by step, which a round-level controller cannot do.
fn adalora_svd_here() -> PyErr {
    bad(
        "scheduler adalora-svd: rankpilot's copy of PEFT's AdaLoRA runs in `rankpilot finetune`; in a Trainer use PEFT's AdaLoraConfig itself; allowed here: fixed, fixed:R, adalora, squeeze, policy:<dir>",
    )
}

fn parse_scheduler(scheduler: &str, budget: &str, sites: &[SiteShape]) -> PyResult<(SchedulerSpec, f64)> {
    let spec = SchedulerSpec::parse(scheduler).map_err(|e| bad(format!("scheduler: {e}")))?;
    if spec == SchedulerSpec::AdaloraSvd {
        return Err(adalora_svd_here());
    }
    let b = BudgetSpec::parse(budget).map_err(|e| bad(format!("budget: {e}")))?;
    if sites.is_empty() {
        return Err(bad("sites: an empty list; allowed: the LoRA modules of the model (at least one)"));
    }
    let ppr: Vec<f64> = sites.iter().map(|s| (s.d_in + s.d_out) as f64).collect();
    Ok((spec, b.params(&ppr)))
}

/// The largest rank `scheduler` can ask for on `sites` at `budget` (the size a fixed-shape
/// adapter must have): a policy's largest rank, adalora's initial rank, squeeze's first rank, or
/// the fixed rank; capped by each site's min(d_in, d_out).
#[pyfunction]
fn largest_rank(scheduler: &str, budget: &str, sites: Vec<SiteShape>) -> PyResult<usize> {
    let (spec, p) = parse_scheduler(scheduler, budget, &sites)?;
    let c: f64 = sites.iter().map(|s| (s.d_in + s.d_out) as f64).sum();
    fn of(spec: &SchedulerSpec, p: f64, c: f64) -> PyResult<usize> {
        Ok(match spec {
            SchedulerSpec::Fixed(Some(r)) => *r,
            SchedulerSpec::Fixed(None) => (p / c).floor() as usize,
            // The schedules' total steps do not change their first rank.
            SchedulerSpec::Adalora => AdaloraSchedule::for_budget(p, c, 1000, 10).init_rank,
            SchedulerSpec::Squeeze => SqueezeSchedule::for_budget(p, c, 10).rank_at(0),
            SchedulerSpec::Policy(dir) => {
                let meta = checkpoint::read_meta(dir).map_err(|e| bad(format!("policy:{}: {e}", dir.display())))?;
                let cfg = policies::trainer::CheckpointConfig::from_json(&meta.config)
                    .map_err(|e| bad(format!("policy:{}: {e}", dir.display())))?;
                cfg.schema.ranks.iter().copied().max().unwrap_or(0) as usize
            }
            SchedulerSpec::SkipUnfit(inner) | SchedulerSpec::Hold(inner) => of(inner, p, c)?,
            // EVA's redistribution reads the input bases `--init eva` computes in the Rust loop;
            // the Trainer callback does not compute them.
            SchedulerSpec::Eva => {
                return Err(bad(
                    "scheduler eva: needs EVA's input bases, which only `rankpilot finetune --init eva` computes; allowed here: fixed, fixed:R, adalora, squeeze, policy:<dir>",
                ));
            }
            SchedulerSpec::AdaloraSvd => return Err(adalora_svd_here()),
        })
    }
    let cap = sites.iter().map(|s| s.d_in.min(s.d_out)).max().unwrap_or(0);
    Ok(of(&spec, p, c)?.min(cap))
}

#[pymethods]
impl Controller {
    /// A controller for `sites` (dicts with `name`, `layer`, `projection`, `d_in`,
    /// `d_out`) under `scheduler` (`fixed`, `fixed:R`, `adalora`, `squeeze`, `policy:<dir>`, or a
    /// classic one with `+skip`) at the average adapter-parameter budget `budget` (`rank:R` or a
    /// number), for a run of `total_steps` optimizer steps in `rounds` rounds, beside `resource`
    /// (a preset name or path; `None`: a fixed parameter budget, nothing lost). `token_entropy`
    /// is the training data's normalised unigram entropy (an observation feature).
    #[new]
    #[pyo3(signature = (scheduler, sites, budget, total_steps, rounds, resource = None, seed = 0, token_entropy = 0.5))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        scheduler: &str,
        sites: Vec<SiteShape>,
        budget: &str,
        total_steps: usize,
        rounds: usize,
        resource: Option<&str>,
        seed: u64,
        token_entropy: f64,
    ) -> PyResult<Self> {
        let (spec, p) = parse_scheduler(scheduler, budget, &sites)?;
        if rounds == 0 || rounds > total_steps {
            return Err(bad(format!("rounds = {rounds}: allowed: 1 to total_steps ({total_steps})")));
        }
        let preset = match resource {
            Some(r) => Some(envs::presets::load(r).map_err(|e| bad(format!("resource: {e}")))?),
            None => None,
        };
        let ppr: Vec<f64> = sites.iter().map(|s| (s.d_in + s.d_out) as f64).collect();
        let max_rank: Vec<usize> = sites.iter().map(|s| s.d_in.min(s.d_out)).collect();
        let sched = spec.build(&ppr, &max_rank, p, total_steps, rounds, tch::Device::Cpu).map_err(from_anyhow)?;
        let signals: Vec<SiteSignals> = sites.iter().map(|s| signals_of(s, None)).collect();
        let res =
            RunResource::new(preset.as_ref(), &signals, sched.rank_set(), rounds, p, seed).map_err(from_anyhow)?;
        let st = RunState { round: 0, rounds, loss: f64::NAN, initial_loss: f64::NAN, token_entropy };
        Ok(Controller { name: sched.name(), sched, res, sites, st, total_steps, budget_params: p })
    }

    /// The plan for round `round` (starting at optimizer step `step`) from each site's
    /// `readings` (dicts with `rank`, `importance`, `component_importance`,
    /// `grad_norm`, `singular_values`), the mean training loss of the last round and the first
    /// step's loss (NaN before any training). Returns `(ranks, skip, info)`; `info` has the
    /// round's `budget` (true), `estimated_budget`, `conservative_budget` and `plan_params`.
    fn plan<'py>(
        &mut self,
        py: Python<'py>,
        round: usize,
        step: usize,
        readings: Vec<SiteReading>,
        loss: f64,
        initial_loss: f64,
    ) -> PyResult<(Vec<usize>, bool, Bound<'py, PyDict>)> {
        if readings.len() != self.sites.len() {
            return Err(bad(format!(
                "readings: {} sites: allowed: one per site ({})",
                readings.len(),
                self.sites.len()
            )));
        }
        if round >= self.st.rounds {
            return Err(bad(format!("round {round}: allowed: 0 to {}", self.st.rounds - 1)));
        }
        let signals: Vec<SiteSignals> = self.sites.iter().zip(&readings).map(|(s, r)| signals_of(s, Some(r))).collect();
        self.res.begin_round();
        self.st.round = round;
        self.st.loss = loss;
        self.st.initial_loss = initial_loss;
        let obs = observe(&self.res, &signals, &self.st);
        let plan = self
            .sched
            .plan(&RoundView {
                round,
                rounds: self.st.rounds,
                step,
                total_steps: self.total_steps,
                signals: &signals,
                observation: &obs,
                context: self.res.context(),
            })
            .map_err(from_anyhow)?;
        let info = PyDict::new(py);
        let ctx = self.res.context();
        info.set_item("budget", self.res.true_budget())?;
        info.set_item("estimated_budget", ctx.estimated_budget)?;
        info.set_item("conservative_budget", ctx.conservative_budget)?;
        let params: usize = plan.ranks.iter().zip(&self.sites).map(|(&r, s)| r * (s.d_in + s.d_out)).sum();
        info.set_item("plan_params", params)?;
        info.set_item("plan_cost", self.res.cost(&plan.ranks))?;
        Ok((plan.ranks, plan.skip, info))
    }

    /// Ends a played round whose adapters have `ranks`: true if the resource delivered it (with
    /// no resource always true; a lost round's training must be rolled back by the caller).
    fn settle(&mut self, ranks: Vec<usize>) -> PyResult<bool> {
        if ranks.len() != self.sites.len() {
            return Err(bad(format!("ranks: {} values: allowed: one per site ({})", ranks.len(), self.sites.len())));
        }
        let cost = self.res.cost(&ranks);
        Ok(self.res.settle(cost))
    }

    /// Ends a skipped round (nothing sent).
    fn settle_skipped(&mut self) {
        self.res.settle_skipped();
    }

    /// The cost of `ranks` in the resource's unit.
    fn cost(&self, ranks: Vec<usize>) -> f64 {
        self.res.cost(&ranks)
    }

    /// Whether the resource is simulated (rounds can be lost).
    #[getter]
    fn simulated(&self) -> bool {
        self.res.simulate
    }

    /// The resource's unit (`bits`, `ms`, `params`, …).
    #[getter]
    fn resource_unit(&self) -> String {
        if self.res.simulate { self.res.spec.resource_unit().to_string() } else { "params".into() }
    }

    /// The rank set the plans come from (a policy's), or `None` for a classic scheduler.
    #[getter]
    fn rank_set(&self) -> Option<Vec<u32>> {
        self.sched.rank_set().map(<[u32]>::to_vec)
    }

    /// What the scheduler has learned during the run and the resource's state (JSON text), for
    /// a resumable checkpoint.
    fn save_state(&self) -> String {
        serde_json::json!({ "scheduler": self.sched.save_state(), "resource": self.res.save_state(), "run": self.st })
            .to_string()
    }

    /// Restores [`Controller::save_state`].
    fn load_state(&mut self, state: &str) -> PyResult<()> {
        let v: serde_json::Value = serde_json::from_str(state).map_err(|e| bad(format!("controller state: {e}")))?;
        self.sched.load_state(&v["scheduler"]).map_err(from_anyhow)?;
        self.res.load_state(&v["resource"]).map_err(from_anyhow)?;
        self.st = serde_json::from_value(v["run"].clone()).map_err(|e| bad(format!("controller state: run: {e}")))?;
        Ok(())
    }
}

fn signals_of(s: &SiteShape, r: Option<&SiteReading>) -> SiteSignals {
    SiteSignals {
        name: s.name.clone(),
        layer: s.layer,
        projection: s.projection.clone(),
        d_in: s.d_in,
        d_out: s.d_out,
        rank: r.map_or(0, |r| r.rank),
        importance: r.map_or(0.0, |r| r.importance),
        component_importance: r.map_or_else(Vec::new, |r| r.component_importance.clone()),
        grad_norm: r.map_or(0.0, |r| r.grad_norm),
        singular_values: r.map_or_else(Vec::new, |r| r.singular_values.clone()),
        input_variance: Vec::new(),
    }
}

/// The names of the global features, in the order of an observation's `global` row.
#[pyfunction]
fn global_feature_names() -> Vec<&'static str> {
    GLOBAL_NAMES.to_vec()
}

/// The names of the per-site features, in the order of a `sites` row.
#[pyfunction]
fn site_feature_names() -> Vec<&'static str> {
    SITE_NAMES.to_vec()
}

/// The embedded environment presets.
#[pyfunction]
fn preset_names() -> Vec<&'static str> {
    envs::presets::NAMES.to_vec()
}

/// Per-environment seed derived from a master seed (SplitMix64), as `rankpilot` derives them.
#[pyfunction]
fn derive_seed(seed: u64, index: u64) -> u64 {
    envs::derive_seed(seed, index)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<VecEnv>()?;
    m.add_class::<RoundContext>()?;
    m.add_class::<Policy>()?;
    m.add_class::<Controller>()?;
    m.add_function(wrap_pyfunction!(largest_rank, m)?)?;
    m.add_function(wrap_pyfunction!(global_feature_names, m)?)?;
    m.add_function(wrap_pyfunction!(site_feature_names, m)?)?;
    m.add_function(wrap_pyfunction!(preset_names, m)?)?;
    m.add_function(wrap_pyfunction!(derive_seed, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
