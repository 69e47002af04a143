//! Machine-readable names of the observation features (same order as the tables in
//! [`crate::env::Observation`]), for logging and for a real run filling the same schema.

use crate::env::{GLOBAL_FEATURES, SITE_FEATURES};

/// Names of the global features.
pub const GLOBAL_NAMES: [&str; GLOBAL_FEATURES] = [
    "resource_channel",
    "resource_compute",
    "resource_budget",
    "budget_ratio_est",
    "budget_ratio_est_lag1",
    "budget_ratio_est_lag2",
    "budget_ratio_est_lag3",
    "budget_ratio_est_lag4",
    "resource_level",
    "bandwidth",
    "token_entropy",
    "oov_rate",
    "progress",
    "loss_ratio",
    "last_violation",
    "last_cost_ratio",
    "mean_rank",
    "n_sites_log",
];

/// Names of the per-site features.
pub const SITE_NAMES: [&str; SITE_FEATURES] = [
    "rank",
    "rank_log",
    "d_in",
    "d_out",
    "cost_share",
    "depth",
    "role_qk",
    "role_vo",
    "role_mlp_in",
    "role_mlp_out",
    "sensitivity",
    "grad_norm",
    "tail_share",
];

/// Index of a global feature by name.
pub fn global_index(name: &str) -> Option<usize> {
    GLOBAL_NAMES.iter().position(|n| *n == name)
}

/// Index of a site feature by name.
pub fn site_index(name: &str) -> Option<usize> {
    SITE_NAMES.iter().position(|n| *n == name)
}
