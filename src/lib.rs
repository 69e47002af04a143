//! rankpilot: a rank-allocation controller for LoRA fine-tuning.
//!
//! This crate is the controller: the CLI ([`cli`]), TensorBoard logging ([`tensorboard`]),
//! checkpoints ([`checkpoint`]) and device selection ([`device`]). The simulated environments
//! live in the `envs` crate, the policies in the `policies` crate.

pub mod checkpoint;
pub mod cli;
pub mod commands;
pub mod device;
pub mod tensorboard;
