//! Simulated LoRA rank-allocation environments for rankpilot (no libtorch).
//!
//! A fine-tuning run is modelled as rounds. Each round a policy picks one LoRA rank per site
//! (adapted projection) from a rank set, the plan is checked against a resource (a wireless
//! channel, a compute/latency budget, or a fixed budget) and, if it fits, every site's residual
//! loss moves toward the floor its rank allows. See [`mod@env`] for the dynamics and reward,
//! [`env::Observation`] for the observation schema, [`oracle`] for the exact per-round solver,
//! [`policy`] for the policy trait and baselines, and [`eval`] for evaluation tables.
//!
//! ```
//! let preset = envs::presets::load("wireless-rayleigh").unwrap();
//! let mut venv = envs::VecEnv::new(&preset, 4, 7).unwrap();
//! let plan = vec![4u32; venv.n_envs() * venv.n_sites()];
//! venv.step(&plan).unwrap();
//! assert_eq!(venv.rewards().len(), 4);
//! ```

#![warn(missing_docs)]
// The hot loops index several parallel per-site arrays at once; iterator zips would hide that.
#![allow(clippy::needless_range_loop)]

pub mod calibration;
pub mod env;
pub mod eval;
pub mod oracle;
pub mod policy;
pub mod presets;
pub mod resource;
pub mod schema;
pub mod sites;

pub use env::{
    EnvSpec, EnvState, EpisodeSummary, GLOBAL_FEATURES, Observation, RoundOutcome, SITE_FEATURES, VecEnv,
    VecEnvSnapshot,
};
pub use eval::{EvalRow, EvalTable, evaluate, evaluate_baselines};
pub use policy::{Baseline, RankPolicy, RoundContext};
pub use presets::EnvPreset;
pub use sites::{RankSet, Role, Site};

/// Everything that can go wrong in this crate; messages name the key or input and what is
/// allowed.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    /// A preset file failed to parse or validate.
    #[error(transparent)]
    Preset(#[from] rankpilot_config::ConfigError),
    /// A value that could only be checked after loading (e.g. ranks against site shapes).
    #[error("key `{key}` = {found}: allowed: {allowed}")]
    Config {
        /// Dotted key.
        key: String,
        /// Value found.
        found: String,
        /// What is allowed.
        allowed: String,
    },
    /// No embedded preset of that name and no such file.
    #[error("unknown preset `{name}`: allowed: {allowed}")]
    UnknownPreset {
        /// What was asked for.
        name: String,
        /// The embedded names.
        allowed: String,
    },
    /// A calibration file failed to parse or check.
    #[error("calibration file {file}: {message}")]
    Calibration {
        /// The file.
        file: String,
        /// What went wrong.
        message: String,
    },
    /// An action with the wrong number of ranks.
    #[error("action has {found} ranks: allowed: exactly {expected} (one rank per site and environment)")]
    ActionLength {
        /// Expected length.
        expected: usize,
        /// Length found.
        found: usize,
    },
    /// A rank outside the rank set.
    #[error("environment {env}, site {site} ({site_name}): rank {rank} is not in the rank set: allowed: {allowed:?}")]
    RankNotInSet {
        /// Environment index in the batch.
        env: usize,
        /// Site index.
        site: usize,
        /// Site name.
        site_name: String,
        /// Rank found (u32::MAX for an out-of-range index).
        rank: u32,
        /// The rank set.
        allowed: Vec<u32>,
    },
}
