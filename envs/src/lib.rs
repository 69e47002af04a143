//! Simulated LoRA rank-allocation environments for rankpilot (no libtorch).
//!
//! A fine-tuning run is modelled as rounds. Each round a policy picks one LoRA rank per site
//! (adapted projection) from a rank set, the plan is checked against a resource (a wireless
//! channel, a compute/latency budget, or a fixed budget) and, if it fits, every site's residual
//! loss moves toward the floor its rank allows.
//!
//! - [`observation`]: the features by name ([`Observation`] has the tables) and their only
//!   writer, shared by the simulator and real runs;
//! - [`spec`]: what does not change during training ([`EnvSpec`]);
//! - [`mod@state`]: one environment's dynamics and reward ([`EnvState`]);
//! - [`vec_env`]: vectorized stepping with auto-reset ([`VecEnv`]);
//! - [`context`]: what a policy may use besides the observation ([`RoundContext`]);
//! - [`oracle`]: the privileged oracle and its exact per-round solver;
//! - [`policy`]: the policy trait and the baselines; [`eval`]: evaluation tables;
//! - [`presets`], [`resource`], [`sites`], [`calibration`]: the environments' inputs.
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
pub mod context;
pub mod distribution;
pub mod eval;
mod noise;
pub mod observation;
pub mod oracle;
pub mod policy;
pub mod presets;
pub mod resource;
pub mod sites;
pub mod spec;
pub mod state;
pub mod vec_env;

pub use context::RoundContext;
pub use eval::{EvalRow, EvalTable, evaluate, evaluate_baselines};
pub use observation::{
    BUDGET_RATIO_CAP, GLOBAL_FEATURES, GlobalFeature, HISTORY, Observation, SITE_FEATURES, SiteFeature,
};
pub use policy::{Baseline, RankPolicy};
pub use presets::EnvPreset;
pub use sites::{RankSet, Role, Site};
pub use spec::EnvSpec;
pub use state::{EnvState, EpisodeSummary, RoundOutcome};
pub use vec_env::{VecEnv, VecEnvSnapshot, derive_seed};

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
