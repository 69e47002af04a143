//! Feasibility projection: make a plan fit the estimated resource budget.
//!
//! The policy samples a rank per site independently, so nothing in the sample itself respects the
//! shared budget. The projection removes rank increments until the plan fits, always the one the
//! policy values least per unit of cost saved: for site i at rank index k, the increment's value
//! is `logit[i][k] − logit[i][k−1]` (how strongly the policy prefers k over the next lower rank)
//! and its cost `cost[i][k] − cost[i][k−1]`. The projection is a deterministic function of the
//! observation and the sampled plan, so PPO treats it as part of the environment: the log-prob
//! used in the update is the sampled plan's.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// A candidate decrement in the heap, ordered so the lowest value-per-cost pops first.
#[derive(PartialEq)]
struct Decrement {
    value_per_cost: f64,
    site: usize,
    from: usize,
}

impl Eq for Decrement {}
impl PartialOrd for Decrement {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Decrement {
    fn cmp(&self, other: &Self) -> Ordering {
        // Min-heap on value per cost; ties broken by site index for determinism.
        other.value_per_cost.total_cmp(&self.value_per_cost).then_with(|| other.site.cmp(&self.site))
    }
}

/// Lowers rank indices in `plan` (per site, into a rank set sorted ascending) until
/// `Σ cost[i][plan[i]] ≤ budget`. `logits` and `cost` are `n_sites × n_ranks`, row-major.
/// Returns the plan's cost after projection; it exceeds `budget` only when even the all-lowest
/// plan does.
pub fn project_to_budget(plan: &mut [usize], logits: &[f32], cost: &[f64], n_ranks: usize, budget: f64) -> f64 {
    let mut total: f64 = plan.iter().enumerate().map(|(i, &k)| cost[i * n_ranks + k]).sum();
    if total <= budget {
        return total;
    }
    let candidate = |site: usize, from: usize| -> Option<Decrement> {
        if from == 0 {
            return None;
        }
        let saved = cost[site * n_ranks + from] - cost[site * n_ranks + from - 1];
        let value = (logits[site * n_ranks + from] - logits[site * n_ranks + from - 1]) as f64;
        Some(Decrement { value_per_cost: value / saved.max(1e-12), site, from })
    };
    let mut heap: BinaryHeap<Decrement> = plan.iter().enumerate().filter_map(|(i, &k)| candidate(i, k)).collect();
    while total > budget {
        let Some(d) = heap.pop() else { break };
        let i = d.site;
        total -= cost[i * n_ranks + d.from] - cost[i * n_ranks + d.from - 1];
        plan[i] = d.from - 1;
        if let Some(next) = candidate(i, plan[i]) {
            heap.push(next);
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feasible_plan_is_untouched() {
        let mut plan = vec![2, 1];
        let cost = [0.0, 1.0, 2.0, 0.0, 1.0, 2.0];
        let total = project_to_budget(&mut plan, &[0.0; 6], &cost, 3, 3.0);
        assert_eq!((plan, total), (vec![2, 1], 3.0));
    }

    #[test]
    fn drops_lowest_value_increments_first() {
        // Site 0 strongly prefers its top rank, site 1 barely does: site 1 gives way.
        let logits = [0.0, 1.0, 5.0, 0.0, 0.1, 0.2];
        let cost = [0.0, 1.0, 2.0, 0.0, 1.0, 2.0];
        let mut plan = vec![2, 2];
        let total = project_to_budget(&mut plan, &logits, &cost, 3, 2.0);
        assert_eq!(plan, vec![2, 0]);
        assert_eq!(total, 2.0);
    }

    #[test]
    fn value_is_per_unit_of_cost() {
        // Same logit gain, but site 1's increment costs 10× more: it goes first.
        let logits = [0.0, 1.0, 0.0, 1.0];
        let cost = [0.0, 1.0, 0.0, 10.0];
        let mut plan = vec![1, 1];
        project_to_budget(&mut plan, &logits, &cost, 2, 5.0);
        assert_eq!(plan, vec![1, 0]);
    }

    #[test]
    fn infeasible_goes_to_lowest() {
        let cost = [1.0, 2.0, 1.0, 2.0];
        let mut plan = vec![1, 1];
        let total = project_to_budget(&mut plan, &[0.0; 4], &cost, 2, 0.5);
        assert_eq!((plan, total), (vec![0, 0], 2.0));
    }
}
