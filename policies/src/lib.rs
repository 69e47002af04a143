//! Rank-allocation policies for rankpilot (tch).
//!
//! - [`network`]: one policy/value network shared across sites, for any number of sites;
//! - [`ppo`]: PPO with GAE, clipping, value clipping, KL early stop — every detail in one file;
//! - [`normalize`]: running observation normalization, saved with the policy;
//! - [`prior`]: the model-based prior the policy's learned residual is added to;
//! - [`belief`]: online inference of an episode's constants for the prior;
//! - [`projection`]: the feasibility projection that makes every plan fit the estimated budget;
//! - [`ddim`]: the DDIM refinement stage with its replay buffer;
//! - [`trainer`]: the training loop around PPO and DDIM, checkpoint parts and resume.

#![warn(missing_docs)]
// PPO and the rollout index several parallel per-environment arrays at once (GAE runs over
// rewards, values and dones together); iterator zips would hide that.
#![allow(clippy::needless_range_loop)]

/// Everything that can go wrong in this crate. Every variant is input that cannot be used (a
/// preset, a checkpoint, an environment that does not fit a policy), which the CLI maps to exit
/// code 2; see [`PolicyError::is_bad_input`].
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The environment preset cannot be built into an environment.
    #[error(transparent)]
    Env(#[from] envs::EnvError),
    /// A checkpoint's config, state or tensors that are missing, malformed or of the wrong shape.
    #[error("{0}")]
    Checkpoint(String),
    /// A policy whose observation schema or rank set does not fit the environment.
    #[error("{0}")]
    Incompatible(String),
}

impl PolicyError {
    /// Whether the error is the user's input (exit code 2) rather than a runtime failure.
    pub fn is_bad_input(&self) -> bool {
        match self {
            PolicyError::Env(_) | PolicyError::Checkpoint(_) | PolicyError::Incompatible(_) => true,
        }
    }
}

pub mod adam;
pub mod belief;
pub mod ddim;
pub mod model;
pub mod network;
pub mod normalize;
pub mod ppo;
pub mod prior;
pub mod projection;
pub mod trainer;
