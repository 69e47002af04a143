//! The privileged oracle and its exact solver.
//!
//! The oracle ([`Oracle::plan_into`], [`Oracle::decide_into`]) knows the hidden spectra, weights,
//! training state and this round's true budget. It values every (site, rank) choice as the return
//! of holding that rank for the rounds left, and skipping the round as holding the current plan,
//! then picks the best plan with [`MckpSolver`].
//!
//! [`MckpSolver`] solves the multiple-choice knapsack (MCKP) exactly: every item (site) picks
//! exactly one choice (rank), one shared capacity (the round's budget), maximise the summed value.
//!
//! # What "exact" means here
//! Costs are compared as `f64` without a grid: the plan returned is optimal among all plans with
//! Σ cost ≤ capacity, up to a relative tolerance of 1e-9 on the objective (floating-point
//! summation). In this crate the costs are integers (rank × params × bits, or rank × FLOPs with
//! integer multipliers), so their sums are exact in `f64` and feasibility is decided exactly.
//!
//! # Algorithm
//! 1. Lagrangian relaxation: g(μ) = μ·B + Σ_i max_j (v_ij − μ·c_ij) is an upper bound on the
//!    optimum for every μ ≥ 0; bisection finds the μ where the relaxed plan's cost crosses B.
//! 2. Incumbent: the relaxed plan at the feasible side of μ, improved greedily.
//! 3. Reduction: a choice whose bound g(μ) − (reduced cost) is below the incumbent cannot be in a
//!    better plan and is dropped. Typically only a handful of sites keep more than one choice.
//! 4. The remaining "core" is solved by dynamic programming over Pareto-optimal (cost, value)
//!    states with the same Lagrangian bound pruning states. This is exact with real costs.
//!
//! If the Pareto state lists ever exceed [`STATE_CAP`] (never observed on the presets) the
//! incumbent is returned and [`SolveStats::exact`] is false.

use crate::presets::ResourceKind;
use crate::spec::EnvSpec;
use crate::state::EnvState;

/// Largest number of Pareto states kept in one DP layer before giving up exactness.
pub const STATE_CAP: usize = 1 << 20;

/// What a solve did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SolveStats {
    /// True when the returned plan is provably optimal.
    pub exact: bool,
    /// Items that kept more than one choice after the reduction.
    pub core_items: usize,
    /// Largest DP layer.
    pub max_states: usize,
}

#[derive(Debug, Clone, Copy)]
struct State {
    cost: f64,
    value: f64,
    parent: u32,
    choice: u16,
}

/// Reusable MCKP solver (keeps its scratch buffers between calls, so repeated solves do not
/// allocate once warmed up).
#[derive(Debug, Default, Clone)]
pub struct MckpSolver {
    alive: Vec<bool>,
    best: Vec<usize>,
    free: Vec<usize>,
    suffix: Vec<f64>,
    layers: Vec<Vec<State>>,
    incumbent: Vec<usize>,
}

impl MckpSolver {
    /// A solver with empty scratch buffers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Solves max Σ_i values[i·k + x_i] s.t. Σ_i costs[i·k + x_i] ≤ capacity, writing the chosen
    /// index x_i per item into `out`. Returns the optimum and stats, or `None` when even the
    /// cheapest plan exceeds the capacity. Costs must be ≥ 0 and finite; `k` ≤ 65535.
    pub fn solve(
        &mut self,
        values: &[f64],
        costs: &[f64],
        k: usize,
        capacity: f64,
        out: &mut [usize],
    ) -> Option<(f64, SolveStats)> {
        let n = out.len();
        assert_eq!(values.len(), n * k);
        assert_eq!(costs.len(), n * k);
        let mut stats = SolveStats { exact: true, ..SolveStats::default() };
        if n == 0 {
            return Some((0.0, stats));
        }
        self.alive.clear();
        self.alive.extend(costs.iter().map(|&c| c <= capacity));
        // Cheapest plan must fit.
        let mut min_cost_sum = 0.0;
        for i in 0..n {
            let row = &costs[i * k..(i + 1) * k];
            let m = row.iter().copied().fold(f64::INFINITY, f64::min);
            if m > capacity {
                return None;
            }
            min_cost_sum += m;
        }
        if min_cost_sum > capacity {
            return None;
        }
        // Relaxed plan at multiplier mu; ties go to the cheaper choice so the cost is
        // monotone in mu.
        let relaxed = |mu: f64, alive: &[bool], best: &mut Vec<usize>| -> (f64, f64, f64) {
            best.clear();
            let (mut f, mut cost, mut val) = (0.0, 0.0, 0.0);
            for i in 0..n {
                let mut bj = usize::MAX;
                let mut bs = f64::NEG_INFINITY;
                for j in 0..k {
                    let idx = i * k + j;
                    if !alive[idx] {
                        continue;
                    }
                    let s = values[idx] - mu * costs[idx];
                    if s > bs || (s == bs && costs[idx] < costs[i * k + bj]) {
                        bs = s;
                        bj = j;
                    }
                }
                best.push(bj);
                f += bs;
                cost += costs[i * k + bj];
                val += values[i * k + bj];
            }
            (mu * capacity + f, cost, val)
        };
        let (g0, c0, v0) = relaxed(0.0, &self.alive, &mut self.best);
        let _ = g0;
        if c0 <= capacity {
            out.copy_from_slice(&self.best);
            return Some((v0, stats));
        }
        // Upper end of the bisection: above the steepest value/cost slope every item takes its
        // cheapest choice, which fits.
        let mut hi: f64 = 0.0;
        for i in 0..n {
            let row_c = &costs[i * k..(i + 1) * k];
            let row_v = &values[i * k..(i + 1) * k];
            for a in 0..k {
                for b in 0..k {
                    if self.alive[i * k + a] && self.alive[i * k + b] && row_c[b] > row_c[a] {
                        hi = hi.max((row_v[b] - row_v[a]) / (row_c[b] - row_c[a]));
                    }
                }
            }
        }
        hi = hi * 2.0 + 1e-300;
        let mut lo = 0.0;
        for _ in 0..100 {
            let mid = 0.5 * (lo + hi);
            if mid <= lo || mid >= hi {
                break;
            }
            let (_, c, _) = relaxed(mid, &self.alive, &mut self.best);
            if c <= capacity {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        let (g_lo, _, _) = relaxed(lo, &self.alive, &mut self.best);
        let (g_hi, mut inc_cost, mut z) = relaxed(hi, &self.alive, &mut self.best);
        let mu = if g_lo < g_hi { lo } else { hi };
        let g = g_lo.min(g_hi);
        // Incumbent: the feasible relaxed plan, greedily improved.
        self.incumbent.clear();
        self.incumbent.extend_from_slice(&self.best);
        for _pass in 0..4 {
            let mut improved = false;
            for i in 0..n {
                let cur = self.incumbent[i];
                let (cc, cv) = (costs[i * k + cur], values[i * k + cur]);
                let mut bj = cur;
                let mut bgain = 0.0;
                for j in 0..k {
                    let idx = i * k + j;
                    if !self.alive[idx] {
                        continue;
                    }
                    let gain = values[idx] - cv;
                    if gain > bgain && inc_cost - cc + costs[idx] <= capacity {
                        bgain = gain;
                        bj = j;
                    }
                }
                if bj != cur {
                    inc_cost += costs[i * k + bj] - cc;
                    z += bgain;
                    self.incumbent[i] = bj;
                    improved = true;
                }
            }
            if !improved {
                break;
            }
        }
        let tol = 1e-9 * (1.0 + z.abs());
        // Reduction by the Lagrangian bound.
        let mut base_cost = 0.0;
        let mut base_value = 0.0;
        self.free.clear();
        self.suffix.clear();
        for i in 0..n {
            let mut m = f64::NEG_INFINITY;
            for j in 0..k {
                if self.alive[i * k + j] {
                    m = m.max(values[i * k + j] - mu * costs[i * k + j]);
                }
            }
            let mut count = 0;
            let mut last = 0;
            for j in 0..k {
                let idx = i * k + j;
                if self.alive[idx] {
                    let rc = m - (values[idx] - mu * costs[idx]);
                    if g - rc < z - tol && j != self.incumbent[i] {
                        self.alive[idx] = false;
                    } else {
                        count += 1;
                        last = j;
                    }
                }
            }
            if count == 1 {
                out[i] = last;
                base_cost += costs[i * k + last];
                base_value += values[i * k + last];
            } else {
                self.free.push(i);
            }
        }
        stats.core_items = self.free.len();
        if self.free.is_empty() {
            if base_cost <= capacity && base_value >= z {
                return Some((base_value, stats));
            }
            out.copy_from_slice(&self.incumbent);
            return Some((z, stats));
        }
        // Suffix bounds over the free items.
        self.suffix.resize(self.free.len() + 1, 0.0);
        for p in (0..self.free.len()).rev() {
            let i = self.free[p];
            let mut m = f64::NEG_INFINITY;
            for j in 0..k {
                if self.alive[i * k + j] {
                    m = m.max(values[i * k + j] - mu * costs[i * k + j]);
                }
            }
            self.suffix[p] = self.suffix[p + 1] + m;
        }
        // Pareto DP over the core.
        while self.layers.len() < self.free.len() + 1 {
            self.layers.push(Vec::new());
        }
        self.layers[0].clear();
        self.layers[0].push(State { cost: base_cost, value: base_value, parent: 0, choice: 0 });
        for p in 0..self.free.len() {
            let i = self.free[p];
            let (prev, rest) = self.layers.split_at_mut(p + 1);
            let prev = &prev[p];
            let next = &mut rest[0];
            next.clear();
            for (si, s) in prev.iter().enumerate() {
                for j in 0..k {
                    let idx = i * k + j;
                    if !self.alive[idx] {
                        continue;
                    }
                    let nc = s.cost + costs[idx];
                    if nc > capacity {
                        continue;
                    }
                    let nv = s.value + values[idx];
                    let ub = nv + mu * (capacity - nc) + self.suffix[p + 1];
                    if ub < z - tol {
                        continue;
                    }
                    next.push(State { cost: nc, value: nv, parent: si as u32, choice: j as u16 });
                }
            }
            next.sort_unstable_by(|a, b| a.cost.total_cmp(&b.cost).then(b.value.total_cmp(&a.value)));
            let mut kept = 0;
            let mut best_v = f64::NEG_INFINITY;
            for t in 0..next.len() {
                if next[t].value > best_v {
                    best_v = next[t].value;
                    next[kept] = next[t];
                    kept += 1;
                }
            }
            next.truncate(kept);
            stats.max_states = stats.max_states.max(kept);
            if kept > STATE_CAP {
                stats.exact = false;
                out.copy_from_slice(&self.incumbent);
                return Some((z, stats));
            }
            if kept == 0 {
                break;
            }
        }
        let last = &self.layers[self.free.len()];
        // The last layer is Pareto-sorted by cost, so its final state has the largest value.
        match last.last() {
            Some(best) if best.value >= z && !self.layers[self.free.len()].is_empty() => {
                let value = best.value;
                let mut si = self.layers[self.free.len()].len() - 1;
                for p in (0..self.free.len()).rev() {
                    let s = self.layers[p + 1][si];
                    out[self.free[p]] = s.choice as usize;
                    si = s.parent as usize;
                }
                Some((value, stats))
            }
            _ => {
                out.copy_from_slice(&self.incumbent);
                Some((z, stats))
            }
        }
    }
}

/// The privileged oracle with the buffers it reuses from round to round: the knapsack solver
/// and one round's value and cost tables.
#[derive(Debug, Clone, Default)]
pub struct Oracle {
    solver: MckpSolver,
    values: Vec<f64>,
    costs: Vec<f64>,
}

impl Oracle {
    /// An oracle with empty buffers.
    pub fn new() -> Self {
        Self::default()
    }

    /// The oracle's decision for environment state `st`: `None` when skipping the round is worth
    /// more than the best plan (only where skipping is allowed: a channel or a compute budget),
    /// else the plan from [`Oracle::plan_into`].
    pub fn decide_into(&mut self, spec: &EnvSpec, st: &EnvState, out: &mut [u32]) -> Option<SolveStats> {
        let stats = self.plan_into(spec, st, out);
        if spec.resource.kind() == ResourceKind::Budget {
            return Some(stats);
        }
        let k = spec.rank_set.len();
        let plan_value: f64 = out
            .iter()
            .enumerate()
            .map(|(l, &r)| self.values[l * k + spec.rank_set.index_of(r).expect("the oracle plans from the set")])
            .sum();
        (plan_value >= skip_value(spec, st)).then_some(stats)
    }

    /// Solves environment state `st`'s round exactly; writes rank values into `out`.
    pub fn plan_into(&mut self, spec: &EnvSpec, st: &EnvState, out: &mut [u32]) -> SolveStats {
        let Oracle { solver, values, costs } = self;
        let cap = plan_tables(spec, st, values, costs);
        let k = spec.rank_set.len();
        let mut choice = vec![0usize; spec.n_sites()];
        match solver.solve(values, costs, k, cap, &mut choice) {
            Some((_, stats)) => {
                for (o, &j) in out.iter_mut().zip(&choice) {
                    *o = spec.rank_set.rank(j);
                }
                stats
            }
            None => {
                // Even the cheapest plan does not fit (only if the smallest rank is > 0): take it.
                for o in out.iter_mut() {
                    *o = spec.rank_set.rank(0);
                }
                SolveStats::default()
            }
        }
    }
}

/// Builds the oracle's per-(site, rank) value and cost tables for this round and returns the
/// capacity (the true budget).
///
/// The value of rank r_j at site l is the return of *holding* that rank for the H rounds
/// left (this one included) under this round's learning rate, as if the plan stayed
/// feasible: with q₀ the captured share after the resize (shrinking loses the dropped share)
/// and ρ = 1 − η, the captured share after t rounds is E_j − (E_j − q₀)·ρᵗ, so the summed
/// loss reduction is w_l·(H·E_j − (E_j − q₀)·S_H) with S_H = Σ_{t=1..H} ρᵗ. Per-round cost
/// terms (λ·c, FLOPs) count H times, the one-off perturbation once. A one-round horizon
/// would undervalue rank, because captured energy persists while the cost is paid once.
pub(crate) fn plan_tables(spec: &EnvSpec, st: &EnvState, values: &mut Vec<f64>, costs: &mut Vec<f64>) -> f64 {
    let k = spec.rank_set.len();
    let n = spec.n_sites();
    let rw = &spec.preset.reward;
    let b = st.res.true_budget.max(f64::MIN_POSITIVE);
    values.clear();
    costs.clear();
    let h = spec.preset.rounds.saturating_sub(st.round).max(1) as f64;
    let d = &spec.preset.dynamics;
    let final_loss = rw.loss_term == crate::presets::LossTerm::Final;
    let s_h = growth_sum(d, st.eta, 1.0, h);
    for l in 0..n {
        let jo = st.rank_idx[l] as usize;
        let e_old = st.energy[l * k + jo] as f64;
        let w = st.w[l] as f64;
        for j in 0..k {
            let e_new = st.energy[l * k + j] as f64;
            let mut q0 = st.captured[l] as f64;
            if j < jo {
                q0 = if e_old > 0.0 { q0 * (e_new / e_old) } else { 0.0 };
            }
            let r = spec.rank_set.rank(j) as f64;
            let cost = r * spec.unit_cost[l];
            let gap = crate::state::gap_share(e_new as f32, q0 as f32);
            let held = if final_loss {
                // What is captured when the episode ends.
                e_new - (e_new - q0).max(0.0) * gap_left(d, st.eta, gap, h)
            } else {
                let s_h = if d.decay_exponent.is_some() { growth_sum(d, st.eta, gap, h) } else { s_h };
                h * e_new - (e_new - q0).max(0.0) * s_h
            };
            let mut v =
                w * held - h * (rw.cost_coef * cost / b + rw.flops_coef * r * spec.flops_per_rank[l] / rw.flops_scale);
            if j != jo && rw.perturbation_coef > 0.0 {
                v -= rw.perturbation_coef * (st.total_energy[l] as f64 * (e_new - e_old).abs()).sqrt() / n as f64;
            }
            values.push(v);
            costs.push(cost);
        }
    }
    b
}

/// The oracle's value of skipping this round, in the units of [`plan_tables`]
/// summed over the sites: this round keeps the captured share q (no progress, no cost), then
/// the current plan is held for the H − 1 rounds after it: w_l·(q + (H−1)·E_cur −
/// (E_cur − q)⁺·S_{H−1}) − (H−1)·(λ·cost/B + FLOPs term). No perturbation: nothing changes.
pub(crate) fn skip_value(spec: &EnvSpec, st: &EnvState) -> f64 {
    let k = spec.rank_set.len();
    let rw = &spec.preset.reward;
    let b = st.res.true_budget.max(f64::MIN_POSITIVE);
    let h = spec.preset.rounds.saturating_sub(st.round).max(1) as f64 - 1.0;
    let d = &spec.preset.dynamics;
    (0..spec.n_sites())
        .map(|l| {
            let j = st.rank_idx[l] as usize;
            let e = st.energy[l * k + j] as f64;
            let q = st.captured[l] as f64;
            let gap = crate::state::gap_share(e as f32, q as f32);
            let r = spec.rank_set.rank(j) as f64;
            let held = if rw.loss_term == crate::presets::LossTerm::Final {
                e - (e - q).max(0.0) * gap_left(d, st.eta, gap, h)
            } else {
                q + h * e - (e - q).max(0.0) * growth_sum(d, st.eta, gap, h)
            };
            st.w[l] as f64 * held
                - h * (rw.cost_coef * r * spec.unit_cost[l] / b
                    + rw.flops_coef * r * spec.flops_per_rank[l] / rw.flops_scale)
        })
        .sum()
}

/// P_h = Π_{t<h} (1 − η_t): the share of a site's gap left after `h` rounds of holding a plan,
/// with the rates of [`growth_sum`] (ρʰ under the exponential law).
fn gap_left(d: &crate::presets::DynamicsConfig, eta: f64, gap: f64, h: f64) -> f64 {
    if d.decay_exponent.is_none() {
        return (1.0 - eta).powf(h);
    }
    let effect = if d.learning_rate > 0.0 { eta / d.learning_rate } else { 0.0 };
    let age = d.age_of_gap(gap);
    (0..h.max(0.0).round() as u32).map(|t| 1.0 - (d.round_rate(age + t as f64) * effect).clamp(0.0, 1.0)).product()
}

/// S_h = Σ_{t=1..h} Π_{i<t} (1 − η_i): what a site's gap leaves summed over `h` rounds of
/// holding a plan (h rounds when nothing is learned), η_0 this round's rate `eta` (its entropy
/// effect included). Under the exponential law every round has that rate, ρ = 1 − η, and
/// S_h = ρ(1 − ρʰ)/η in closed form (`gap` is not used); under the power law the rates are the
/// law's from the site's age, the age of a site whose uncaptured share is `gap`
/// ([`crate::presets::DynamicsConfig::age_of_gap`]), each scaled by this round's entropy effect.
fn growth_sum(d: &crate::presets::DynamicsConfig, eta: f64, gap: f64, h: f64) -> f64 {
    if d.decay_exponent.is_none() {
        let rho = 1.0 - eta;
        return if eta > 0.0 { rho * (1.0 - rho.powf(h)) / eta } else { h };
    }
    let effect = if d.learning_rate > 0.0 { eta / d.learning_rate } else { 0.0 };
    let age = d.age_of_gap(gap);
    let (mut left, mut sum) = (1.0, 0.0);
    for t in 0..h.max(0.0).round() as u32 {
        left *= 1.0 - (d.round_rate(age + t as f64) * effect).clamp(0.0, 1.0);
        sum += left;
    }
    sum
}

/// Exhaustive search (kʰ plans); for tests on small instances.
pub fn brute_force(values: &[f64], costs: &[f64], k: usize, capacity: f64) -> Option<(f64, Vec<usize>)> {
    let n = values.len() / k;
    let mut x = vec![0usize; n];
    let mut best: Option<(f64, Vec<usize>)> = None;
    loop {
        let c: f64 = (0..n).map(|i| costs[i * k + x[i]]).sum();
        if c <= capacity {
            let v: f64 = (0..n).map(|i| values[i * k + x[i]]).sum();
            if best.as_ref().is_none_or(|(bv, _)| v > *bv) {
                best = Some((v, x.clone()));
            }
        }
        let mut p = 0;
        loop {
            if p == n {
                return best;
            }
            x[p] += 1;
            if x[p] < k {
                break;
            }
            x[p] = 0;
            p += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use crate::VecEnv;
    use crate::presets::{self, EnvPreset};

    fn small_preset(preset: &str, projections: &str) -> EnvPreset {
        let text = presets::embedded_text(preset).unwrap();
        let text = text
            .lines()
            .map(|l| {
                if l.starts_with("layers =") {
                    "layers = 1".to_string()
                } else if l.starts_with("projections =") {
                    format!("projections = {projections}")
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        presets::from_toml(&text, "small.toml", None).unwrap()
    }

    fn check(values: &[f64], costs: &[f64], k: usize, cap: f64) {
        let n = values.len() / k;
        let mut s = MckpSolver::new();
        let mut out = vec![0; n];
        let got = s.solve(values, costs, k, cap, &mut out);
        let want = brute_force(values, costs, k, cap);
        match (got, want) {
            (None, None) => {}
            (Some((v, st)), Some((bv, _))) => {
                assert!(st.exact);
                assert!((v - bv).abs() <= 1e-9 * (1.0 + bv.abs()), "solver {v} brute {bv}");
                let c: f64 = (0..n).map(|i| costs[i * k + out[i]]).sum();
                let vv: f64 = (0..n).map(|i| values[i * k + out[i]]).sum();
                assert!(c <= cap);
                assert!((vv - v).abs() <= 1e-9 * (1.0 + v.abs()));
            }
            (g, w) => panic!("solver {g:?} brute {w:?}"),
        }
    }

    #[test]
    fn matches_brute_force_on_random_instances() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for trial in 0..400 {
            let n = rng.random_range(1..=6);
            let k = rng.random_range(1..=6);
            let mut values = vec![0.0; n * k];
            let mut costs = vec![0.0; n * k];
            for i in 0..n {
                let unit = rng.random_range(1..20) as f64;
                let mut v = rng.random_range(-1.0..0.0);
                for j in 0..k {
                    // Mix of concave-increasing rows and arbitrary ones.
                    if trial % 3 == 0 {
                        values[i * k + j] = rng.random_range(-1.0..1.0);
                        costs[i * k + j] = rng.random_range(0..30) as f64;
                    } else {
                        v += rng.random_range(0.0..1.0) / (j + 1) as f64;
                        values[i * k + j] = v;
                        costs[i * k + j] = unit * (1 << j) as f64 - unit;
                    }
                }
            }
            let total_max: f64 = (0..n).map(|i| costs[i * k..(i + 1) * k].iter().copied().fold(0.0, f64::max)).sum();
            let cap = rng.random_range(0.0..=1.0) * total_max;
            check(&values, &costs, k, cap);
        }
    }

    #[test]
    fn infeasible_returns_none() {
        let mut s = MckpSolver::new();
        let mut out = [0; 2];
        assert!(s.solve(&[1.0, 2.0, 1.0, 2.0], &[5.0, 6.0, 5.0, 6.0], 2, 9.0, &mut out).is_none());
    }

    #[test]
    fn oracle_matches_brute_force_on_small_envs() {
        for name in presets::NAMES {
            if name == "llama7b" {
                continue;
            }
            for proj in ["[\"q\", \"v\", \"down\"]", "[\"q\", \"k\", \"v\", \"o\", \"gate\", \"down\"]"] {
                let p = small_preset(name, proj);
                let mut venv = VecEnv::new(&p, 3, 11).unwrap();
                let n = venv.n_sites();
                let k = venv.spec().rank_set.len();
                let mut rng = ChaCha8Rng::seed_from_u64(5);
                for round in 0..12 {
                    for e in 0..venv.n_envs() {
                        let spec = venv.spec().clone();
                        let mut values = Vec::new();
                        let mut costs = Vec::new();
                        let cap = plan_tables(&spec, venv.state(e), &mut values, &mut costs);
                        let (plan, stats) = venv.oracle_plan(e);
                        assert!(stats.exact);
                        let (bv, _) = brute_force(&values, &costs, k, cap).unwrap();
                        let v: f64 = plan
                            .iter()
                            .enumerate()
                            .map(|(l, &r)| values[l * k + spec.rank_set.index_of(r).unwrap()])
                            .sum();
                        let c = spec.plan_cost(&plan).unwrap();
                        assert!(c <= cap, "{name}: oracle plan over budget");
                        assert!(
                            (v - bv).abs() <= 1e-9 * (1.0 + bv.abs()),
                            "{name} round {round}: oracle {v} brute force {bv}"
                        );
                    }
                    // Random actions (mostly feasible) to reach varied states with shrinks.
                    let rs = venv.spec().rank_set.clone();
                    let plan: Vec<u32> = (0..venv.n_envs() * n)
                        .map(|_| rs.rank(rand::Rng::random_range(&mut rng, 0..k / 2 + 2)))
                        .collect();
                    venv.step(&plan).unwrap();
                }
            }
        }
    }

    #[test]
    fn the_hold_value_follows_the_power_law_from_the_sites_age() {
        // With no entropy effect the rates after this round are the law's own, from the age of a
        // site with that gap: S_h = Σ G(a+t)/G(a).
        let mut p = presets::load("wireless-rayleigh").unwrap();
        p.dynamics.entropy_effect = 0.0;
        p.dynamics.decay_exponent = Some(0.7);
        let c = -(1.0 - p.dynamics.learning_rate).ln();
        let g = |a: f64| (1.0 + a * c / 0.7).powf(-0.7);
        for (gap, age) in [(1.0, 0.0), (g(4.0), 4.0), (g(11.5), 11.5)] {
            assert!((p.dynamics.age_of_gap(gap) - age).abs() < 1e-9 * (1.0 + age), "gap {gap}");
            let eta = p.dynamics.learning_rate;
            for h in [1.0, 5.0, 16.0] {
                let want: f64 = (1..=h as u32).map(|t| g(age + t as f64) / g(age)).sum();
                let got = growth_sum(&p.dynamics, eta, gap, h);
                assert!((got - want).abs() < 1e-9 * want, "age {age} h {h}: {got} vs {want}");
            }
        }
        // The exponential keeps its closed form, whatever the gap.
        p.dynamics.decay_exponent = None;
        let rho: f64 = 1.0 - 0.3;
        assert!((growth_sum(&p.dynamics, 0.3, 0.2, 5.0) - (1..=5).map(|t| rho.powi(t)).sum::<f64>()).abs() < 1e-12);
    }
}
