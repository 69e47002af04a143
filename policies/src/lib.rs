//! Rank-allocation policies for rankpilot (tch).
//!
//! - [`network`]: one policy/value network shared across sites, for any number of sites;
//! - [`ppo`]: PPO with GAE, clipping, value clipping, KL early stop — every detail in one file;
//! - [`normalize`]: running observation normalization, saved with the policy;
//! - [`prior`]: the model-based prior the policy's learned residual is added to;
//! - [`projection`]: the feasibility projection that makes every plan fit the estimated budget.

pub mod adam;
pub mod ddim;
pub mod model;
pub mod network;
pub mod normalize;
pub mod ppo;
pub mod prior;
pub mod projection;
pub mod trainer;
